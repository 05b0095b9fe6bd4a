//! Pinned maps read and written many entries per syscall.
//!
//! A bulk drop load writes millions of hash and array entries; at one
//! syscall each that is most of its time. [`Table`] sends them in chunks
//! of [`CHUNK`] through the kernel's batch commands, and falls back to one
//! entry per syscall where the kernel has no batch command for the map
//! (kernels before 5.6, map types without them).

use std::{
    collections::HashMap,
    hash::Hash,
    io,
    marker::PhantomData,
    os::fd::AsFd,
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{Pod, maps::MapData};

use super::{KernelError, MapWriteError};
use crate::sys::{self, BatchError, BpfMap};

/// Entries per batch syscall: large enough that the syscall's own cost
/// vanishes, small enough that the kernel's copy buffers stay small.
pub(super) const CHUNK: usize = 8192;

/// A map of `K` to `V` (the eBPF side's own types).
pub(super) struct Table<K, V> {
    map: BpfMap,
    name: &'static str,
    /// Cleared the first time the kernel refuses a batch command.
    batched: AtomicBool,
    _types: PhantomData<fn() -> (K, V)>,
}

/// Whether a batch call that did nothing failed because the kernel has no
/// such command for this map: an unknown command is `EINVAL` (before 5.6),
/// a map type without it `ENOTSUPP` (524, a kernel-internal errno that
/// reaches user space here) or `EOPNOTSUPP`.
fn unsupported(e: &BatchError) -> bool {
    e.done == 0 && no_such_command(&e.source)
}

fn no_such_command(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

impl<K: Pod, V: Pod> Table<K, V> {
    /// `batched: false` writes one entry per syscall from the start.
    pub(super) fn new(
        data: &MapData,
        name: &'static str,
        batched: bool,
    ) -> Result<Self, KernelError> {
        let io_err = |source: io::Error| KernelError::Io {
            op: "opening the map",
            path: name.into(),
            source,
        };
        let fd = data.fd().as_fd().try_clone_to_owned().map_err(io_err)?;
        let map = BpfMap::new(fd).map_err(io_err)?;
        if map.key_size() != size_of::<K>() || map.value_size() != size_of::<V>() {
            return Err(io_err(io::Error::other(format!(
                "the map's key and value take {} and {} bytes, this build's {} and {}",
                map.key_size(),
                map.value_size(),
                size_of::<K>(),
                size_of::<V>()
            ))));
        }
        Ok(Table {
            map,
            name,
            batched: AtomicBool::new(batched),
            _types: PhantomData,
        })
    }

    fn err(&self, source: io::Error) -> MapWriteError {
        MapWriteError {
            name: self.name,
            source,
        }
    }

    fn batched(&self) -> bool {
        self.batched.load(Ordering::Relaxed)
    }

    fn refused_batches(&self) {
        if self.batched.swap(false, Ordering::Relaxed) {
            tracing::info!(
                map = self.name,
                "this kernel has no batch map commands for this map; writing one entry per syscall"
            );
        }
    }

    pub(super) fn get(&self, key: &K) -> Result<Option<V>, MapWriteError> {
        let mut value: V = sys::zeroed_pod();
        let found = self
            .map
            .lookup(
                sys::pod_bytes(key),
                sys::pod_slice_bytes_mut(std::slice::from_mut(&mut value)),
            )
            .map_err(|e| self.err(e))?;
        Ok(found.then_some(value))
    }

    /// Writes every entry, in order. On failure the entries before the
    /// failing one took effect and the rest did not.
    pub(super) fn set(&self, entries: &[(K, V)]) -> Result<(), MapWriteError> {
        for chunk in entries.chunks(CHUNK) {
            if self.batched() {
                let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
                let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
                match self
                    .map
                    .update_batch(sys::pod_slice_bytes(&keys), sys::pod_slice_bytes(&values))
                {
                    Ok(()) => continue,
                    Err(e) if unsupported(&e) => self.refused_batches(),
                    Err(e) => return Err(self.err(e.source)),
                }
            }
            for (k, v) in chunk {
                self.map
                    .update(sys::pod_bytes(k), sys::pod_bytes(v))
                    .map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Deletes every key; keys already absent are what was wanted anyway.
    pub(super) fn delete(&self, keys: &[K]) -> Result<(), MapWriteError> {
        let mut rest = keys;
        while !rest.is_empty() && self.batched() {
            let chunk = &rest[..rest.len().min(CHUNK)];
            match self.map.delete_batch(sys::pod_slice_bytes(chunk)) {
                Ok(()) => rest = &rest[chunk.len()..],
                // The kernel stops at an absent key: skip it, go on after.
                Err(e) if e.source.raw_os_error() == Some(libc::ENOENT) => {
                    rest = &rest[e.done + 1..];
                }
                Err(e) if unsupported(&e) => self.refused_batches(),
                Err(e) => return Err(self.err(e.source)),
            }
        }
        for k in rest {
            self.map
                .delete(sys::pod_bytes(k))
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Every entry the map holds (for an array: every index).
    pub(super) fn entries(&self) -> Result<Vec<(K, V)>, MapWriteError> {
        let mut out = Vec::new();
        if self.batched() {
            match self.read_batches(None, usize::MAX, &mut out) {
                Ok(()) => return Ok(out),
                Err(e) if out.is_empty() && no_such_command(&e) => self.refused_batches(),
                Err(e) => return Err(self.err(e)),
            }
        }
        let mut key: Option<K> = None;
        while let Some(next) = self
            .map
            .next_key(key.as_ref().map(sys::pod_bytes))
            .map_err(|e| self.err(e))?
        {
            let next: K = sys::read_pod(&next).expect("a key of the map's key size");
            // A key deleted between the two calls is simply not listed.
            if let Some(v) = self.get(&next)? {
                out.push((next, v));
            }
            key = Some(next);
        }
        Ok(out)
    }

    /// Entries in the map's own order (an array's: by index) after the
    /// position `after` (`None`: from the first), at most `limit` of them,
    /// a batch per syscall.
    fn read_batches(
        &self,
        after: Option<Vec<u8>>,
        limit: usize,
        out: &mut Vec<(K, V)>,
    ) -> io::Result<()> {
        // On the heap: a chunk of keys and values is hundreds of KiB.
        let mut keys: Vec<K> = std::iter::repeat_n(sys::zeroed_pod(), CHUNK).collect();
        let mut values: Vec<V> = std::iter::repeat_n(sys::zeroed_pod(), CHUNK).collect();
        let mut token = after;
        let mut next = vec![0u8; self.map.token_size()];
        let mut read = 0;
        while read < limit {
            let want = (limit - read).min(CHUNK);
            let (n, more) = self.map.lookup_batch(
                token.as_deref(),
                &mut next,
                sys::pod_slice_bytes_mut(&mut keys[..want]),
                sys::pod_slice_bytes_mut(&mut values[..want]),
            )?;
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
            read += n;
            if !more || n == 0 {
                break;
            }
            token = Some(next.clone());
        }
        Ok(())
    }
}

impl<K: Pod + Eq + Hash, V: Pod> Table<K, V> {
    /// What each key holds now. Many keys at once are answered from one
    /// read of the whole map, a few by a lookup each.
    pub(super) fn get_many(&self, keys: &[K]) -> Result<Vec<Option<V>>, MapWriteError> {
        // A whole read costs about a lookup per 16 entries the map can
        // hold (bucket walks plus copies); past that, it is the cheaper.
        if self.batched() && keys.len() >= 64 && keys.len() * 16 >= self.map.max_entries() as usize
        {
            let all: HashMap<K, V> = self.entries()?.into_iter().collect();
            return Ok(keys.iter().map(|k| all.get(k).copied()).collect());
        }
        keys.iter().map(|k| self.get(k)).collect()
    }
}

impl<V: Pod> Table<u32, V> {
    /// What each index of an array holds now. Many indices are read as the
    /// one run of the array from the lowest to the highest, in batches.
    pub(super) fn array_values(&self, indices: &[u32]) -> Result<Vec<V>, MapWriteError> {
        let (Some(&lo), Some(&hi)) = (indices.iter().min(), indices.iter().max()) else {
            return Ok(Vec::new());
        };
        let span = (hi - lo) as usize + 1;
        // A run read costs far less per entry than a lookup, but not
        // nothing: only when the indices fill a good part of it.
        if !self.batched() || indices.len() < 64 || span > indices.len() * 8 {
            return indices
                .iter()
                .map(|i| Ok(self.get(i)?.unwrap_or_else(sys::zeroed_pod)))
                .collect();
        }
        let run = self.read_run(lo, span).map_err(|e| self.err(e))?;
        Ok(indices.iter().map(|&i| run[(i - lo) as usize]).collect())
    }

    /// `span` values from index `lo` on.
    fn read_run(&self, lo: u32, span: usize) -> io::Result<Vec<V>> {
        let mut run = Vec::with_capacity(span);
        // A batch lookup starts after the index in its position.
        let after = lo.checked_sub(1).map(|p| p.to_ne_bytes().to_vec());
        self.read_batches(after, span, &mut run)?;
        if run.len() < span {
            return Err(io::Error::other(format!(
                "the array ended after {} of the {span} entries read from index {lo}",
                run.len()
            )));
        }
        Ok(run.into_iter().map(|(_, v)| v).collect())
    }
}

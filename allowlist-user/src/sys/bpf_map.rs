//! BPF map calls made directly, on byte buffers the caller sized from the
//! map's own key and value types: single elements (a shared fd needs no
//! `&mut` handle, so the edge workers write without a lock around the
//! syscall), and the batch commands aya 0.14 does not offer, which move
//! thousands of entries per syscall (kernel 5.6 and later; hash maps and
//! arrays, not LPM tries).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `bpf_attr` of the `BPF_MAP_*_ELEM` commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `bpf_attr` of the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: entries offered; out: entries the kernel processed.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is the bpf_attr layout of `cmd`, and every pointer in
    // it was set by the callers below from live buffers whose lengths they
    // checked against the counts they pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn elem(map: BorrowedFd<'_>, key: &[u8], value: u64) -> ElemAttr {
    ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value,
        flags: 0,
    }
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`.
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &mut elem(map, key, value.as_ptr() as u64),
    )
}

/// The `bpf_attr` of `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The front of the kernel's `struct bpf_map_info`; the kernel fills what
/// fits in `info_len`.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// A map fd with the sizes the kernel gave it, so that every call below
/// can check its buffers against them: the kernel reads and writes exactly
/// the map's key and value sizes per entry.
#[derive(Debug)]
pub struct BpfMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

/// A batch call that stopped early: the first `done` entries took effect,
/// entry `done` failed with `source`, the rest were not tried.
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub source: io::Error,
}

/// A kernel that refuses the command outright (none for this map type, or
/// an unknown command before 5.6) leaves `count` as it was; one that fails
/// on an entry sets it to the entries done before that one.
fn batch_error(attr: &BatchAttr, offered: usize, source: io::Error) -> BatchError {
    let reported = attr.count as usize;
    BatchError {
        done: if reported < offered { reported } else { 0 },
        source,
    }
}

impl BpfMap {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let mut info = MapInfo::default();
        let mut attr = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfo>() as u32,
            info: &mut info as *mut MapInfo as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok(BpfMap {
            fd,
            key_size: info.key_size as usize,
            value_size: info.value_size as usize,
            max_entries: info.max_entries,
        })
    }

    pub fn key_size(&self) -> usize {
        self.key_size
    }

    pub fn value_size(&self) -> usize {
        self.value_size
    }

    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// How many entries `keys` and `values` hold; panics on buffers that
    /// are not whole entries of this map, or disagree on the count.
    fn entries(&self, keys: usize, values: Option<usize>) -> usize {
        assert!(
            keys.is_multiple_of(self.key_size),
            "key buffer of {keys} bytes for keys of {}",
            self.key_size
        );
        let n = keys / self.key_size;
        if let Some(values) = values {
            assert_eq!(values, n * self.value_size, "value buffer for {n} entries");
        }
        n
    }

    /// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`.
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        assert_eq!(self.entries(key.len(), Some(value.len())), 1);
        map_update(self.fd(), key, value)
    }

    /// `BPF_MAP_LOOKUP_ELEM` into `value`; `Ok(false)` when the key is absent.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        assert_eq!(self.entries(key.len(), Some(value.len())), 1);
        match bpf(
            BPF_MAP_LOOKUP_ELEM,
            &mut elem(self.fd(), key, value.as_mut_ptr() as u64),
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `BPF_MAP_DELETE_ELEM`; `Ok(false)` when the key was absent.
    pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
        assert_eq!(self.entries(key.len(), None), 1);
        match bpf(BPF_MAP_DELETE_ELEM, &mut elem(self.fd(), key, 0)) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (`None`: the first), or
    /// `None` past the last.
    pub fn next_key(&self, key: Option<&[u8]>) -> io::Result<Option<Vec<u8>>> {
        if let Some(key) = key {
            assert_eq!(self.entries(key.len(), None), 1);
        }
        let mut next = vec![0u8; self.key_size];
        let mut attr = elem(self.fd(), key.unwrap_or(&[]), next.as_mut_ptr() as u64);
        if key.is_none() {
            attr.key = 0;
        }
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => Ok(Some(next)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn batch(&self, count: usize) -> BatchAttr {
        BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: 0,
            values: 0,
            count: u32::try_from(count).expect("callers chunk batches far below u32::MAX"),
            map_fd: self.fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        }
    }

    /// `BPF_MAP_UPDATE_BATCH` with `BPF_ANY`: keys and values back to back.
    pub fn update_batch(&self, keys: &[u8], values: &[u8]) -> Result<(), BatchError> {
        let count = self.entries(keys.len(), Some(values.len()));
        if count == 0 {
            return Ok(());
        }
        let mut attr = self.batch(count);
        attr.keys = keys.as_ptr() as u64;
        attr.values = values.as_ptr() as u64;
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr).map_err(|source| batch_error(&attr, count, source))
    }

    /// `BPF_MAP_DELETE_BATCH`: keys back to back. The kernel stops at the
    /// first absent key (`ENOENT`, with `done` naming it).
    pub fn delete_batch(&self, keys: &[u8]) -> Result<(), BatchError> {
        let count = self.entries(keys.len(), None);
        if count == 0 {
            return Ok(());
        }
        let mut attr = self.batch(count);
        attr.keys = keys.as_ptr() as u64;
        bpf(BPF_MAP_DELETE_BATCH, &mut attr).map_err(|source| batch_error(&attr, count, source))
    }

    /// The size of the position a batch lookup reads and writes: an array's
    /// key, or a hash map's four-byte bucket number.
    pub fn token_size(&self) -> usize {
        self.key_size.max(4)
    }

    /// One `BPF_MAP_LOOKUP_BATCH` call: as many entries as `keys` holds,
    /// after the position in `token` (`None`: from the start), into `keys`
    /// and `values`; the position after them goes to `next`. Returns how
    /// many entries came back and whether the map has more.
    pub fn lookup_batch(
        &self,
        token: Option<&[u8]>,
        next: &mut [u8],
        keys: &mut [u8],
        values: &mut [u8],
    ) -> io::Result<(usize, bool)> {
        let count = self.entries(keys.len(), Some(values.len()));
        assert!(count > 0);
        assert!(next.len() == self.token_size() && token.is_none_or(|t| t.len() == next.len()));
        let mut attr = self.batch(count);
        attr.in_batch = token.map_or(0, |t| t.as_ptr() as u64);
        attr.out_batch = next.as_mut_ptr() as u64;
        attr.keys = keys.as_mut_ptr() as u64;
        attr.values = values.as_mut_ptr() as u64;
        match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => Ok((attr.count as usize, true)),
            // The end of the map; the last entries may come with it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((attr.count as usize, false)),
            Err(e) => Err(e),
        }
    }
}

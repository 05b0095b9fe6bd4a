//! The one module allowed `unsafe`: system calls and raw memory the rest
//! of the crate needs as safe functions — bpffs, the monotonic clock the
//! eBPF side uses, mmap of array maps, bpf map updates, the few socket
//! calls the edge makes outside std and tokio, registering owned fds with
//! tokio, and plain-data byte views of the kernel's shared types.
#![allow(unsafe_code)]

mod bpf_map;

pub use bpf_map::{BatchError, BpfMap, map_update};

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

/// CLOCK_MONOTONIC in ns: what `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Whether `path` lies on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and statfs buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on a bpf filesystem, mounting one at its nearest
/// existing ancestor's usual place (`/sys/fs/bpf`) when none is mounted.
/// Returns the mount point it mounted, if it did.
pub fn ensure_bpffs(dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    let mut mounted = None;
    if !is_bpffs(&existing)? {
        // Mount at /sys/fs/bpf when the folder is meant to live there,
        // otherwise at the folder itself.
        let target = if dir.starts_with("/sys/fs/bpf") {
            PathBuf::from("/sys/fs/bpf")
        } else {
            std::fs::create_dir_all(dir)?;
            dir.to_path_buf()
        };
        let src = CString::new("bpf").expect("no NUL");
        let tgt = CString::new(target.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
        // SAFETY: valid C strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        mounted = Some(target);
    }
    std::fs::create_dir_all(dir)?;
    Ok(mounted)
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array map of `u32`.
pub struct MmapU32 {
    ptr: NonNull<AtomicU32>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory accessed through atomics.
unsafe impl Send for MmapU32 {}
unsafe impl Sync for MmapU32 {}

impl MmapU32 {
    pub fn new(fd: impl AsFd, len: usize) -> io::Result<Self> {
        let bytes = len * 4;
        // SAFETY: mapping a map fd the kernel allows to be mmapped; the
        // length is the map's size; failure is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MmapU32 {
            ptr: NonNull::new(p.cast()).expect("mmap returned NULL"),
            len,
        })
    }

    pub fn get(&self, i: u32) -> u32 {
        assert!((i as usize) < self.len);
        // SAFETY: in bounds; the eBPF side reads the slot concurrently, so
        // every access is atomic.
        unsafe { (*self.ptr.as_ptr().add(i as usize)).load(Ordering::Acquire) }
    }

    pub fn set(&self, i: u32, v: u32) {
        assert!((i as usize) < self.len);
        // SAFETY: as in `get`. Release orders the slot after the rule and
        // hash writes made before it (those went through syscalls).
        unsafe { (*self.ptr.as_ptr().add(i as usize)).store(v, Ordering::Release) }
    }

    /// Number of non-zero slots (for fill-level reporting).
    pub fn count_nonzero(&self) -> usize {
        (0..self.len as u32).filter(|&i| self.get(i) != 0).count()
    }
}

impl Drop for MmapU32 {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * 4) };
    }
}

/// Whether `ifname` is a virtual device (veth, bridge ...): those have no
/// `device` link in sysfs. Driver-mode XDP collapses on veth in VMs, so
/// `auto` picks generic mode for them.
pub fn is_virtual_interface(ifname: &str) -> bool {
    !Path::new("/sys/class/net")
        .join(ifname)
        .join("device")
        .exists()
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from /proc/self/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The socket cookie of `fd` (SO_COOKIE), the key of `CONNS`.
pub fn socket_cookie(fd: std::os::fd::RawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Makes a later close of `fd` send an RST instead of a FIN.
pub fn abortive_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid pointer to a linger of the stated size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// accept4(2) with the new socket non-blocking and close-on-exec, as an
/// async runtime wants it, in one syscall (std's `accept` needs a second
/// one to make the socket non-blocking).
pub fn accept_nonblocking(
    listener: std::os::fd::RawFd,
) -> io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
    use std::{
        net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
        os::fd::FromRawFd,
    };
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the stated size.
    let fd = unsafe {
        libc::accept4(
            listener,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new socket we now own.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read((&raw const addr).cast::<libc::sockaddr_in>()) };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&raw const addr).cast::<libc::sockaddr_in6>()) };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            ))
        }
        f => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("accepted a socket of address family {f}"),
            ));
        }
    };
    Ok((stream, peer))
}

/// Registers a value that owns its fd with tokio's reactor.
pub fn async_fd<T: AsRawFd>(
    inner: T,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its fd and reports that same fd for as long as
    // the AsyncFd owns `inner` (a listener, a ring buffer map).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(inner, interest) }
        .map_err(|e| e.into_parts().1)
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The bytes of a plain-data kernel type (a map key or value).
pub fn pod_bytes<T: aya::Pod>(v: &T) -> &[u8] {
    pod_slice_bytes(std::slice::from_ref(v))
}

/// The bytes of a slice of plain-data kernel types, back to back as a
/// batch map call reads them.
pub fn pod_slice_bytes<T: aya::Pod>(v: &[T]) -> &[u8] {
    // SAFETY: aya::Pod types are repr(C) plain data without padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The same, writable: a batch lookup fills it.
pub fn pod_slice_bytes_mut<T: aya::Pod>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; and any bit pattern is a valid aya::Pod value, so
    // whatever the kernel writes leaves valid values.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A plain-data kernel type with every byte zero: a buffer for the kernel
/// to fill.
pub fn zeroed_pod<T: aya::Pod>() -> T {
    // SAFETY: any bit pattern, zero included, is a valid aya::Pod value.
    unsafe { std::mem::zeroed() }
}

/// A plain-data kernel type read from the front of `bytes` (a ring buffer
/// record), if it is long enough.
pub fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; any bit pattern is a valid aya::Pod value.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The gid of group `name`, if it exists.
pub fn group_gid(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// Whether user `uid` belongs to group `gid` (as its primary group or a
/// supplementary one).
pub fn user_in_group(uid: u32, gid: u32) -> bool {
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return false;
    }
    if pwd.pw_gid == gid {
        return true;
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: pw_name points into `buf`, alive here; `groups` holds `n`.
    let rc = unsafe { libc::getgrouplist(pwd.pw_name, pwd.pw_gid, groups.as_mut_ptr(), &mut n) };
    rc >= 0 && groups[..n.max(0) as usize].contains(&gid)
}

#[cfg(test)]
mod tests {
    use std::{io::Read, os::fd::AsRawFd};

    #[test]
    fn accept_nonblocking_reports_the_peer_and_never_blocks() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(host) else {
                continue; // no IPv6 loopback here
            };
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut stream, peer) = super::accept_nonblocking(listener.as_raw_fd()).unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            let err = stream.read(&mut [0; 8]).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
            listener.set_nonblocking(true).unwrap();
            let err = super::accept_nonblocking(listener.as_raw_fd()).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        }
    }
}

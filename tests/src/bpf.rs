//! A few raw `bpf(2)` calls, so tests can make and alter pinned maps the way an older or
//! different `lb` would have left them, without going through `lb`'s own loader (which
//! refuses what it cannot use).
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_OBJ_PIN: i64 = 6;
const BPF_OBJ_GET: i64 = 7;
/// `BPF_MAP_TYPE_ARRAY`.
pub const MAP_TYPE_ARRAY: u32 = 2;

/// `union bpf_attr`, zero-filled beyond what a command uses (the kernel requires that).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32_at(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: i64, attr: &mut Attr, what: &str) -> Result<i64> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_owned());
    }
    Ok(rc)
}

/// Creates an array map of `value_size`-byte values named `name`.
pub fn create_array(name: &str, value_size: u32, max_entries: u32) -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32_at(0, MAP_TYPE_ARRAY)
        .u32_at(4, 4)
        .u32_at(8, value_size)
        .u32_at(12, max_entries);
    // map_name: 16 bytes at offset 28.
    let n = name.as_bytes();
    if n.len() >= 16 {
        bail!("map name {name:?} too long");
    }
    a.0[28..28 + n.len()].copy_from_slice(n);
    let fd = bpf(BPF_MAP_CREATE, &mut a, &format!("creating map {name}"))?;
    // SAFETY: a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins `fd` at `path` (on a bpffs).
pub fn pin(fd: &OwnedFd, path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("path")?;
    let mut a = Attr::new();
    a.u64_at(0, c.as_ptr() as u64)
        .u32_at(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a, &format!("pinning {}", path.display())).map(|_| ())
}

/// Opens the object pinned at `path`.
pub fn get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("path")?;
    let mut a = Attr::new();
    a.u64_at(0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut a, &format!("opening {}", path.display()))?;
    // SAFETY: a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The value at index `key` of array map `fd`, `len` bytes long.
pub fn lookup(fd: &OwnedFd, key: u32, len: usize) -> Result<Vec<u8>> {
    let mut value = vec![0u8; len];
    let mut a = Attr::new();
    a.u32_at(0, fd.as_raw_fd() as u32)
        .u64_at(8, (&raw const key) as u64)
        .u64_at(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a, "map lookup")?;
    Ok(value)
}

/// Writes `value` at index `key` of array map `fd`.
pub fn update(fd: &OwnedFd, key: u32, value: &[u8]) -> Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, fd.as_raw_fd() as u32)
        .u64_at(8, (&raw const key) as u64)
        .u64_at(16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a, "map update").map(|_| ())
}

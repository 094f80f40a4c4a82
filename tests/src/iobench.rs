//! O_DIRECT I/O loops for the benchmarks: sequential 1 MiB write/read and 4 KiB random
//! write, timed, on any block device or file.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

/// A page-aligned buffer, as O_DIRECT needs.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes. Precondition: `len > 0`.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, layout }
    }

    /// A buffer of `len` pseudo-random bytes from [`crate::pattern`].
    pub fn new(len: usize, fill_seed: u64) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len);
        b.bytes_mut()
            .copy_from_slice(&crate::pattern(fill_seed, len));
        b
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn open_direct(dev: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", dev.display()))
}

/// MiB/s of sequential 1 MiB writes over the first `total` bytes, including the final fsync.
pub fn seq_write(dev: &Path, total: u64) -> f64 {
    let f = open_direct(dev);
    let buf = AlignedBuf::new(1 << 20, 1);
    let t = Instant::now();
    let mut off = 0;
    while off < total {
        f.write_all_at(buf.bytes(), off).expect("write");
        off += 1 << 20;
    }
    f.sync_all().expect("fsync");
    total as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// MiB/s of sequential 1 MiB reads over the first `total` bytes.
pub fn seq_read(dev: &Path, total: u64) -> f64 {
    seq_read_chunked(dev, total, 1 << 20)
}

/// MiB/s of sequential reads of `chunk` bytes each over the first `total` bytes.
pub fn seq_read_chunked(dev: &Path, total: u64, chunk: usize) -> f64 {
    let f = open_direct(dev);
    let mut buf = AlignedBuf::new(chunk, 0);
    let t = Instant::now();
    let mut off = 0;
    while off < total {
        f.read_exact_at(buf.bytes_mut(), off).expect("read");
        off += chunk as u64;
    }
    total as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// IOPS of `ops` random 4 KiB writes within the first `span` bytes, including the final fsync.
pub fn rand_write(dev: &Path, span: u64, ops: u64) -> f64 {
    let f = open_direct(dev);
    let buf = AlignedBuf::new(4096, 2);
    let blocks = span / 4096;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let t = Instant::now();
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.write_all_at(buf.bytes(), (x % blocks) * 4096)
            .expect("write");
    }
    f.sync_all().expect("fsync");
    ops as f64 / t.elapsed().as_secs_f64()
}

/// p50 and p99 of a set of durations in milliseconds.
pub fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    (at(0.50), at(0.99))
}

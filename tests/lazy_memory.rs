//! A 1 GiB `RamDisk` and a 1 GiB `GuestRam` are created at once and cost
//! (almost) no resident memory until written; writing a few pages makes
//! about those pages resident, not the whole block.
//!
//! One test in a binary of its own: the resident-set figure is per process,
//! so nothing else may allocate or free in parallel while it is read.
#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use vmio::virtio::blk::{BlockBackend, RamDisk};
use vmio::virtio::{GuestMemory, GuestRam};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Pages written after creation, one every 64 MiB.
const WRITES: u64 = 16;
const STRIDE: u64 = 64 * MIB;
/// Creation is one `mmap`; the old eager allocation took seconds.
const CREATE_BOUND: Duration = Duration::from_millis(500);
/// Slack on every resident-set comparison: allocator arenas, page tables,
/// the test harness.
const SLACK: u64 = 16 * MIB;
/// With transparent huge pages set to `always`, one written 4 KiB page may
/// make a whole 2 MiB page resident.
const PER_WRITE: u64 = 2 * MIB;

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("a VmRSS line");
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("VmRSS in kB");
    kib * 1024
}

/// Creates a 1 GiB object with `make`, writes one page every 64 MiB with
/// `write`, and checks time and resident-set growth at each step.
fn check_lazy<T>(what: &str, make: impl FnOnce() -> T, write: impl Fn(&T, u64, &[u8; 4096])) -> T {
    let before = rss();
    let t = Instant::now();
    let made = make();
    let took = t.elapsed();
    let created = rss();
    assert!(took < CREATE_BOUND, "{what}: creating 1 GiB took {took:?}");
    assert!(
        created.saturating_sub(before) < SLACK,
        "{what}: creating 1 GiB made {} MiB resident",
        created.saturating_sub(before) / MIB
    );
    let page = [0xa5u8; 4096];
    for i in 0..WRITES {
        write(&made, i * STRIDE, &page);
    }
    let written = rss();
    let grew = written.saturating_sub(created);
    println!(
        "{what}: 1 GiB created in {took:?}, RSS +{} KiB; {WRITES} pages written, RSS +{} KiB",
        created.saturating_sub(before) / 1024,
        grew / 1024
    );
    // The measurement is live: the written pages did become resident.
    assert!(grew >= WRITES * 4096, "{what}: {WRITES} written pages, RSS grew {grew} bytes");
    assert!(
        grew < WRITES * PER_WRITE + SLACK,
        "{what}: {WRITES} written pages made {} MiB resident",
        grew / MIB
    );
    made
}

#[test]
fn one_gib_ram_disk_and_guest_ram_are_resident_only_where_written() {
    let disk = check_lazy(
        "RamDisk",
        || RamDisk::new(GIB),
        |d, off, page| d.write_at(off, page).expect("inside the disk"),
    );
    assert_eq!(disk.size(), GIB);
    let mut back = [0u8; 4096];
    disk.read_at(STRIDE, &mut back).unwrap();
    assert_eq!(back, [0xa5; 4096]);
    // Unwritten sectors read as zeroes (without becoming resident).
    disk.read_at(STRIDE + 4096, &mut back).unwrap();
    assert_eq!(back, [0; 4096]);
    drop(disk);

    let ram = check_lazy(
        "GuestRam",
        || GuestRam::new(0x1_0000_0000, GIB).expect("1 GiB of guest RAM"),
        |r, off, page| r.write(0x1_0000_0000 + off, page).expect("inside guest RAM"),
    );
    assert_eq!(ram.read_u64(0x1_0000_0000 + STRIDE), Ok(0xa5a5_a5a5_a5a5_a5a5));
    assert_eq!(ram.read_u64(0x1_0000_0000 + STRIDE + 4096), Ok(0));
}

//! Hot-plug under a live guest: while the vCPUs boot Linux, this thread
//! plugs scratch devices into free MMIO and port ranges, checks each through
//! its own dispatch handle, removes it again and checks it is gone; every
//! few rounds it does the same with a whole virtio-blk disk the guest is
//! never told about.

use std::sync::Arc;
use std::time::Duration;

use vmio::{DeviceConfig, DeviceManager, Width};

use crate::vcpu::RunState;

/// Free ranges: above the disks' MMIO windows, and ports nothing on a PC
/// decodes.
pub const SCRATCH_MMIO: u64 = 0xd800_0000;
pub const SCRATCH_PORTS: u64 = 0x500;
/// The hidden disk's window and IOAPIC pin (not on the kernel command line).
pub const HIDDEN_DISK: u64 = 0xd900_0000;
pub const HIDDEN_IRQ: u32 = 10;
/// The dispatch handle's vCPU id: not a real vCPU.
const HANDLE_ID: u32 = 1000;

/// What the thread did.
#[derive(Default, Debug)]
pub struct HotplugStats {
    pub rounds: u64,
    pub plugged: u64,
    pub removed: u64,
    pub hidden_disk_rounds: u64,
    /// Dispatches through this thread's handle that found what they should.
    pub checks: u64,
    pub failures: Vec<String>,
}

impl HotplugStats {
    /// Configuration edits published (each plug and each removal).
    pub fn edits(&self) -> u64 {
        self.plugged + self.removed
    }
}

const VIRTIO_MAGIC: u64 = 0x7472_6976;

/// Runs until the run stops, one round every `period`.
pub fn run(manager: Arc<DeviceManager>, run: Arc<RunState>, period: Duration) -> HotplugStats {
    let mut stats = HotplugStats::default();
    let mut io = manager.vcpu(HANDLE_ID);
    let (mut mmio_bus, mut pio_bus) =
        (manager.mmio().handle(HANDLE_ID), manager.pio().handle(HANDLE_ID));
    while !run.stopping() {
        let k = stats.rounds;
        stats.rounds += 1;
        let mmio_base = SCRATCH_MMIO + (k % 16) * 0x1000;
        let port = SCRATCH_PORTS + (k % 8) * 8;
        let (mname, pname) = (format!("scratch-mmio-{k}"), format!("scratch-pio-{k}"));
        let value = 0x5eed_0000 + k;
        let mmio = DeviceConfig::new(mname.clone(), "reserved", mmio_base, 0x1000)
            .with_param("value", value);
        let pio = DeviceConfig::new(pname.clone(), "reserved", port, 8)
            .with_param("space", "pio")
            .with_param("value", value & 0xff);
        match manager.add_all(&[mmio, pio]) {
            Ok(()) => stats.plugged += 2,
            Err(e) => {
                check(&mut stats, format!("plug round {k}: {e}"), false);
                break;
            }
        }
        let got = io.handle_mmio_read(mmio_base + 8, Width::U32);
        check(&mut stats, format!("{mname} read {got:x?}"), got == Ok(value & 0xffff_ffff));
        let got = io.handle_port_read(port as u16, Width::U8);
        check(&mut stats, format!("{pname} read {got:x?}"), got == Ok(value & 0xff));

        if k % 4 == 3 {
            hidden_disk(&manager, &mut io, &mut stats);
        }
        sleep_unless_stopped(&run, period);

        for name in [&mname, &pname] {
            match manager.remove(name).map(|u| u.wait()) {
                Ok(Ok(())) => stats.removed += 1,
                Ok(Err(e)) => check(&mut stats, format!("unplug wait {name}: {e}"), false),
                Err(e) => check(&mut stats, format!("remove {name}: {e}"), false),
            }
        }
        // Gone: the bus itself (no miss policy in between) must miss.
        let gone = mmio_bus.read(mmio_base + 8, Width::U32).is_err()
            && pio_bus.read(port, Width::U8).is_err();
        check(&mut stats, format!("round {k}: scratch devices still answer after removal"), gone);
        sleep_unless_stopped(&run, period);
    }
    stats
}

/// Plugs a RAM-backed virtio-blk disk, reads its magic through the
/// dispatch handle, and removes it (waiting for its line to be lowered).
fn hidden_disk(manager: &DeviceManager, io: &mut vmio::VcpuIo, stats: &mut HotplugStats) {
    let disk = DeviceConfig::new("hidden-disk", "virtio-blk", HIDDEN_DISK, 0x200)
        .with_irq(HIDDEN_IRQ)
        .with_param("ram_size", 1u64 << 20)
        .with_param("trigger", "edge")
        .with_param("serial", "never-announced");
    if let Err(e) = manager.add(disk) {
        check(stats, format!("plug hidden-disk: {e}"), false);
        return;
    }
    stats.plugged += 1;
    stats.hidden_disk_rounds += 1;
    let magic = io.handle_mmio_read(HIDDEN_DISK, Width::U32);
    check(stats, format!("hidden-disk magic {magic:x?}"), magic == Ok(VIRTIO_MAGIC));
    match manager.remove_and_wait("hidden-disk") {
        Ok(()) => stats.removed += 1,
        Err(e) => check(stats, format!("remove hidden-disk: {e}"), false),
    }
}

/// Counts a check that passed, or keeps (the first few) failures.
fn check(stats: &mut HotplugStats, what: String, ok: bool) {
    if ok {
        stats.checks += 1;
    } else if stats.failures.len() < 16 {
        stats.failures.push(what);
    }
}

fn sleep_unless_stopped(run: &RunState, period: Duration) {
    let step = Duration::from_millis(10);
    let mut left = period;
    while !left.is_zero() && !run.stopping() {
        let d = left.min(step);
        std::thread::sleep(d);
        left -= d;
    }
}

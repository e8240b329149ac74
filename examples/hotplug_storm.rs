//! vCPU threads hammer an MMIO bus with reads and writes while a hot-plug
//! thread registers, moves and removes devices underneath them.
//!
//! Every device checks each call: the access must land at a start address the
//! device owned during the call (its current one, or the previous one while a
//! move's grace period is still open), and no call may arrive after the
//! device's unplug completed. The run ends with a summary table and a verdict;
//! the exit code is non-zero when the verdict fails.
//!
//! ```sh
//! cargo run --release --example hotplug_storm -- [--seconds N] [--devices N] [--vcpus N]
//! cargo run --release --example hotplug_storm -- --config examples/vm.toml
//! ```
//!
//! With `--config`, the VM's devices are built from the TOML file by a
//! `DeviceManager` whose MMIO bus also carries the storm; every vCPU also
//! dispatches to each configured device on its own bus, and the hot-plug
//! thread regularly removes one configured device by name and adds it back
//! from its configuration.

#[path = "../tests/common/rng.rs"]
mod rng;
use rng::Rng;

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmio::{
    Access, AccessError, Device, DeviceConfig, DeviceError, DeviceId, DeviceManager, Edit, IoBus,
    IoRange, Mmio, Space, Unplug, Width,
};

const BASE: u64 = 0xd000_0000;
const SLOT: u64 = 0x1000;
/// No start address: an empty slot in `Storm::valid`.
const NONE: u64 = u64::MAX;
/// One dispatch in `SAMPLE` is timed, so the clock reads do not dominate.
const SAMPLE: u64 = 16;
/// Latency histogram resolution: 1 ns buckets up to 20 µs, then overflow.
const BUCKETS: usize = 20_000;

struct Options {
    seconds: f64,
    devices: u64,
    vcpus: usize,
    config: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let cores = thread::available_parallelism().map_or(2, usize::from);
    let mut o = Options { seconds: 3.0, devices: 256, vcpus: cores, config: None };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => o.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--devices" => o.devices = value()?.parse().map_err(|e| format!("--devices: {e}"))?,
            "--vcpus" => o.vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--config" => o.config = Some(value()?),
            "--help" | "-h" => {
                return Err("usage: hotplug_storm [--seconds N] [--devices N] [--vcpus N] \
                            [--config VM.toml]"
                    .into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.devices < 2 || o.vcpus == 0 {
        return Err("need at least 2 devices and 1 vCPU".into());
    }
    Ok(o)
}

/// A register bank that checks every call it gets.
struct Storm {
    tag: u64,
    /// Start addresses at which the device may be reached right now: the
    /// current one and, during a move's grace period, the previous one.
    valid: [AtomicU64; 2],
    /// Set once an unplug of this device completed.
    retired: AtomicBool,
    scratch: AtomicU64,
    calls: AtomicU64,
    violations: Arc<AtomicU64>,
}

impl Storm {
    fn check(&self, a: Access) {
        // The writer changes `valid` and `retired` only before publishing or
        // after a grace period, and the bus's epoch protocol orders those
        // against this call. A settle (`[old, new]` -> `[new, NONE]`) can
        // still race with this check, so it stores `valid[0]` first and
        // `valid[1]` with Release, and we load `valid[1]` first with Acquire:
        // whichever state we see, the start we were reached at is in it.
        self.calls.fetch_add(1, Ordering::Relaxed);
        let start = a.addr - a.offset;
        let second = self.valid[1].load(Ordering::Acquire);
        let owned = start == self.valid[0].load(Ordering::Relaxed) || start == second;
        if !owned || self.retired.load(Ordering::Relaxed) {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Device for Storm {
    fn read(&self, a: Access) -> Result<u64, DeviceError> {
        self.check(a);
        Ok(self.tag << 32 | a.offset)
    }
    fn write(&self, a: Access, value: u64) -> Result<(), DeviceError> {
        self.check(a);
        self.scratch.store(value, Ordering::Relaxed);
        Ok(())
    }
}

/// What the hot-plug thread knows about one slot.
enum SlotState {
    Empty,
    Live {
        id: DeviceId,
        dev: Arc<Storm>,
    },
    /// A device left this slot; the slot is reusable once the grace period ends.
    Draining {
        dev: Arc<Storm>,
        unplug: Unplug,
        removed: bool,
    },
}

struct VcpuStats {
    dispatches: u64,
    unmapped: u64,
    misrouted: u64,
    histogram: Vec<u64>,
    /// Accesses to configured devices: answered, unplugged at the time, refused.
    vm_ok: u64,
    vm_unplugged: u64,
    vm_refused: u64,
}

/// The VM built from `--config` around the storm (no devices without it).
struct Vm {
    manager: DeviceManager,
    /// The file's devices, to add back after a removal.
    configs: Vec<DeviceConfig>,
    /// Where each vCPU pokes each configured device: its bus and base.
    targets: Vec<(Space, u64)>,
    /// Bytes the VM's consoles wrote.
    console_bytes: Arc<AtomicU64>,
}

impl Vm {
    fn load(path: Option<&str>) -> Result<Vm, String> {
        let console_bytes = Arc::new(AtomicU64::new(0));
        let Some(path) = path else {
            let manager = DeviceManager::new();
            return Ok(Vm { manager, configs: Vec::new(), targets: Vec::new(), console_bytes });
        };
        #[cfg(not(feature = "config"))]
        {
            Err(format!("--config {path}: this build left out the default `config` feature"))
        }
        #[cfg(feature = "config")]
        {
            let vm = vmio::VmDeviceConfig::from_toml_file(path).map_err(|e| e.to_string())?;
            let bytes = console_bytes.clone();
            // Guest RAM for the VM's DMA devices (virtio-blk rings and buffers).
            let ram = vmio::GuestRam::new(0x8000_0000, 16 << 20).map_err(|e| e.to_string())?;
            let manager = DeviceManager::builder()
                .memory(Arc::new(ram))
                .interrupts(Arc::new(NoGuestIrqs))
                .console(Arc::new(move |_: &str, b: &[u8]| {
                    // Relaxed: a display counter.
                    bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                }))
                .build(&vm)
                .map_err(|e| format!("{path}: {e}"))?;
            let targets = manager.devices().iter().map(|d| (d.space, d.config.base)).collect();
            Ok(Vm { manager, configs: vm.devices, targets, console_bytes })
        }
    }

    /// One read of each configured device's first register.
    fn poke(&self, io: &mut vmio::VcpuIo, s: &mut VcpuStats) {
        for &(space, addr) in &self.targets {
            let r = match space {
                Space::Mmio => io.handle_mmio_read(addr, Width::U32).map(drop),
                // Bases were validated against each bus's size at build.
                Space::Pio => io.handle_port_read(addr as u16, Width::U8).map(drop),
                Space::SysReg => io.handle_sysreg_read(addr as u32, Width::U8).map(drop),
            };
            match r.map_err(|e| e.error) {
                Ok(()) => s.vm_ok += 1,
                Err(AccessError::Unmapped { .. }) => s.vm_unplugged += 1,
                Err(AccessError::Device { .. }) => s.vm_refused += 1,
                // A straddle, or a failure this example does not know.
                Err(_) => s.misrouted += 1,
            }
        }
    }
}

fn vcpu_loop(
    vm: &Vm,
    bus: &IoBus<Mmio>,
    vcpu: u32,
    slots: u64,
    stop: &AtomicBool,
    progress: &AtomicU64,
) -> VcpuStats {
    let mut h = bus.handle(vcpu);
    let mut io = vm.manager.vcpu(vcpu);
    let mut s = VcpuStats {
        dispatches: 0,
        unmapped: 0,
        misrouted: 0,
        histogram: vec![0; BUCKETS + 1],
        vm_ok: 0,
        vm_unplugged: 0,
        vm_refused: 0,
    };
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d ^ (u64::from(vcpu) << 17 | 1));
    let widths = [Width::U8, Width::U16, Width::U32, Width::U64];
    // Relaxed: `stop` is a plain flag; nothing is published through it.
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            let rng = rng.next();
            let width = widths[(rng & 3) as usize];
            let offset = (rng >> 8) % (SLOT / 8) * 8;
            let addr = BASE + (rng >> 24) % slots * SLOT + offset;
            let timed = s.dispatches.is_multiple_of(SAMPLE);
            let t0 = timed.then(Instant::now);
            let result = if rng & 4 == 0 {
                h.read(addr, width).map(|v| {
                    // The value must come from whichever device sits there,
                    // at the offset we asked for.
                    if v & 0xffff_ffff & width.mask() != offset & width.mask() {
                        s.misrouted += 1;
                    }
                })
            } else {
                h.write(addr, width, rng)
            };
            if let Some(t0) = t0 {
                let ns = t0.elapsed().as_nanos().min(BUCKETS as u128) as usize;
                s.histogram[ns] += 1;
            }
            match result {
                Ok(()) => {}
                Err(vmio::AccessError::Unmapped { .. }) => s.unmapped += 1,
                Err(_) => s.misrouted += 1,
            }
            s.dispatches += 1;
        }
        vm.poke(&mut io, &mut s);
        // Relaxed: a progress counter for display only.
        progress.fetch_add(256, Ordering::Relaxed);
    }
    s
}

fn percentile(hist: &[u64], p: f64) -> String {
    let total: u64 = hist.iter().sum();
    let want = ((total as f64) * p).ceil() as u64;
    let mut seen = 0;
    for (ns, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= want.max(1) {
            return if ns == BUCKETS { format!(">{BUCKETS} ns") } else { format!("{ns} ns") };
        }
    }
    "-".into()
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let vm = match Vm::load(opts.config.as_deref()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // The storm shares the VM's MMIO bus (an empty one without `--config`).
    let bus = vm.manager.mmio().clone();
    let violations = Arc::new(AtomicU64::new(0));
    let mut next_tag = 0u64;
    let mut new_dev = |start: u64| {
        next_tag += 1;
        Arc::new(Storm {
            tag: next_tag,
            valid: [AtomicU64::new(start), AtomicU64::new(NONE)],
            retired: AtomicBool::new(false),
            scratch: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            violations: violations.clone(),
        })
    };
    // Three quarters of the slots are populated at start.
    let slots = opts.devices * 4 / 3;
    let range = |slot: u64| IoRange::<Mmio>::new(BASE + slot * SLOT, SLOT).expect("slot fits");
    let storm_last = BASE + slots * SLOT - 1;
    if let Some(d) = vm.manager.devices().iter().find(|d| {
        d.space == Space::Mmio
            && d.config.base <= storm_last
            && BASE < d.config.base + d.config.length
    }) {
        eprintln!(
            "device `{}` overlaps the storm's window {BASE:#x}..={storm_last:#x}",
            d.config.name
        );
        return ExitCode::from(2);
    }
    let mut state: Vec<SlotState> = Vec::new();
    for slot in 0..slots {
        if slot % 4 == 3 {
            state.push(SlotState::Empty);
            continue;
        }
        let dev = new_dev(range(slot).start());
        let id = bus.register(range(slot), dev.clone()).expect("initial layout is disjoint");
        state.push(SlotState::Live { id, dev });
    }

    println!(
        "hotplug_storm: {} vCPU threads, {} devices in {} slots, {:.1} s",
        opts.vcpus,
        bus.len() - vm.targets.iter().filter(|t| t.0 == Space::Mmio).count(),
        slots,
        opts.seconds
    );
    if let Some(path) = &opts.config {
        println!("VM from {path}: {} configured devices", vm.configs.len());
    }
    let mut replugs = 0u64;
    let stop = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    let edits = AtomicU64::new(0);
    let mut retired_devices = 0u64;
    let mut vcpu_stats = Vec::new();
    let mut elapsed = Duration::ZERO;
    thread::scope(|s| {
        let vcpus: Vec<_> = (0..opts.vcpus)
            .map(|v| {
                let (bus, stop, progress) = (&bus, &stop, &progress);
                let vm = &vm;
                s.spawn(move || vcpu_loop(vm, bus, v as u32, slots, stop, progress))
            })
            .collect();

        let start = Instant::now();
        let mut last_print = start;
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        let run_for = Duration::from_secs_f64(opts.seconds);
        let mut tick = 0u64;
        let mut replugging: Option<(&DeviceConfig, Unplug)> = None;
        while start.elapsed() < run_for {
            let rng = rng.next();
            tick += 1;
            if !vm.configs.is_empty() && tick.is_multiple_of(256) {
                // Unplug one configured device by name; once no vCPU can be
                // inside it any more, plug it back from its configuration.
                match replugging.take() {
                    None => {
                        let cfg = &vm.configs[replugs as usize % vm.configs.len()];
                        let unplug = vm
                            .manager
                            .remove(&cfg.name)
                            .expect("configured devices keep their names");
                        replugging = Some((cfg, unplug));
                    }
                    Some((cfg, unplug)) if unplug.poll() => {
                        vm.manager.add(cfg.clone()).expect("the device's range is still free");
                        replugs += 1;
                    }
                    still_draining => replugging = still_draining,
                }
            }
            let slot = (rng >> 8) % slots;
            let op = rng % 3;
            let i = slot as usize;
            match (&state[i], op) {
                (SlotState::Empty, _) => {
                    let dev = new_dev(range(slot).start());
                    let id = bus.register(range(slot), dev.clone()).expect("slot is free");
                    state[i] = SlotState::Live { id, dev };
                }
                (SlotState::Live { id, dev }, 0) => {
                    let (id, dev) = (*id, dev.clone());
                    let unplug = bus.unregister(id).expect("device is live");
                    state[i] = SlotState::Draining { dev, unplug, removed: true };
                }
                (SlotState::Live { id, dev }, _) => {
                    // Move to a random empty slot, in one transaction.
                    let to = (rng >> 32) % slots;
                    // One move at a time per device: `valid` has room for
                    // one old start still inside its grace period.
                    let settled = dev.valid[1].load(Ordering::Relaxed) == NONE;
                    if settled && to != slot && matches!(state[to as usize], SlotState::Empty) {
                        let (id, dev) = (*id, dev.clone());
                        dev.valid[1].store(range(to).start(), Ordering::Relaxed);
                        let c = bus
                            .transaction([Edit::Remap { id, range: range(to) }])
                            .expect("target slot is free");
                        state[to as usize] = SlotState::Live { id, dev: dev.clone() };
                        state[i] = SlotState::Draining { dev, unplug: c.unplug, removed: false };
                    }
                }
                (SlotState::Draining { .. }, _) => {}
            }
            // Relaxed: display counter.
            edits.fetch_add(1, Ordering::Relaxed);
            // Close grace periods that have ended.
            for st in state.iter_mut() {
                if let SlotState::Draining { dev, unplug, removed } = st
                    && unplug.poll()
                {
                    if *removed {
                        dev.retired.store(true, Ordering::Relaxed);
                        retired_devices += 1;
                    } else {
                        // The move's old start is no longer reachable: make
                        // the new one the only valid start (new first, so it
                        // is valid at every moment).
                        dev.valid[0].store(dev.valid[1].load(Ordering::Relaxed), Ordering::Relaxed);
                        // Release: pairs with the Acquire in `Storm::check`.
                        dev.valid[1].store(NONE, Ordering::Release);
                    }
                    *st = SlotState::Empty;
                }
            }
            if last_print.elapsed() > Duration::from_millis(500) {
                last_print = Instant::now();
                eprint!(
                    "\r[{:4.1} s] {:>12} dispatches  {:>9} hot-plug edits  {} devices ",
                    start.elapsed().as_secs_f64(),
                    progress.load(Ordering::Relaxed),
                    edits.load(Ordering::Relaxed),
                    bus.len()
                );
                let _ = std::io::stderr().flush();
            }
        }
        elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        vcpu_stats = vcpus.into_iter().map(|h| h.join().expect("vCPU thread")).collect();
    });
    eprintln!();
    // Finish the last grace periods now that the vCPUs are gone.
    for st in &mut state {
        if let SlotState::Draining { dev, unplug, removed: true } = st {
            unplug.wait().expect("not inside a dispatch");
            dev.retired.store(true, Ordering::Relaxed);
            retired_devices += 1;
        }
    }

    let secs = elapsed.as_secs_f64();
    let edits = edits.load(Ordering::Relaxed);
    println!();
    println!("| vCPU | dispatches/s | unmapped | p50 latency | p99 latency |");
    println!("|-----:|-------------:|---------:|------------:|------------:|");
    let mut total = 0;
    let mut all = vec![0u64; BUCKETS + 1];
    for (v, s) in vcpu_stats.iter().enumerate() {
        total += s.dispatches;
        for (a, b) in all.iter_mut().zip(&s.histogram) {
            *a += b;
        }
        println!(
            "| {v:>4} | {:>12.0} | {:>7.1}% | {:>11} | {:>11} |",
            s.dispatches as f64 / secs,
            100.0 * s.unmapped as f64 / s.dispatches.max(1) as f64,
            percentile(&s.histogram, 0.50),
            percentile(&s.histogram, 0.99),
        );
    }
    println!(
        "|  all | {:>12.0} |          | {:>11} | {:>11} |",
        total as f64 / secs,
        percentile(&all, 0.50),
        percentile(&all, 0.99)
    );
    println!();
    println!(
        "hot-plug edits/s: {:.0} ({edits} edits, {retired_devices} unplugs completed)",
        edits as f64 / secs
    );
    if opts.config.is_some() {
        let sum = |f: fn(&VcpuStats) -> u64| vcpu_stats.iter().map(f).sum::<u64>();
        println!(
            "configured devices: {} accesses answered, {} while unplugged, {} refused; \
             {replugs} remove/add cycles by name; {} console bytes",
            sum(|s| s.vm_ok),
            sum(|s| s.vm_unplugged),
            sum(|s| s.vm_refused),
            vm.console_bytes.load(Ordering::Relaxed)
        );
    }

    let device_violations = violations.load(Ordering::Relaxed);
    let misrouted: u64 = vcpu_stats.iter().map(|s| s.misrouted).sum();
    let ok = device_violations == 0 && misrouted == 0 && total > 0;
    println!(
        "integrity: {} ({misrouted} misrouted accesses, {device_violations} calls outside a device's ownership or after its unplug)",
        if ok { "PASS" } else { "FAIL" }
    );
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// The demo has no guest to interrupt: every line the config names exists
/// and goes nowhere.
#[cfg(feature = "config")]
struct NoGuestIrqs;

#[cfg(feature = "config")]
impl vmio::InterruptController for NoGuestIrqs {
    fn line(&self, _irq: u32) -> Option<Arc<dyn vmio::IrqLine>> {
        struct Nowhere;
        impl vmio::IrqLine for Nowhere {
            fn pulse(&self) {}
        }
        Some(Arc::new(Nowhere))
    }
}

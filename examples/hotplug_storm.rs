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
//! ```

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmio::{Access, Device, DeviceError, DeviceId, Edit, IoBus, IoRange, Mmio, Unplug, Width};

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
}

fn parse_args() -> Result<Options, String> {
    let cores = thread::available_parallelism().map_or(2, usize::from);
    let mut o = Options { seconds: 3.0, devices: 256, vcpus: cores };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => o.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--devices" => o.devices = value()?.parse().map_err(|e| format!("--devices: {e}"))?,
            "--vcpus" => o.vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--help" | "-h" => {
                return Err("usage: hotplug_storm [--seconds N] [--devices N] [--vcpus N]".into());
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
        // Relaxed is enough: the writer changes `valid` and `retired` only
        // before publishing or after a grace period, both of which order
        // them against this call through the bus's epoch protocol.
        self.calls.fetch_add(1, Ordering::Relaxed);
        let start = a.addr - a.offset;
        let owned = self.valid.iter().any(|v| v.load(Ordering::Relaxed) == start);
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
}

fn vcpu_loop(
    bus: &IoBus<Mmio>,
    vcpu: u32,
    slots: u64,
    stop: &AtomicBool,
    progress: &AtomicU64,
) -> VcpuStats {
    let mut h = bus.handle(vcpu);
    let mut s =
        VcpuStats { dispatches: 0, unmapped: 0, misrouted: 0, histogram: vec![0; BUCKETS + 1] };
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ (u64::from(vcpu) << 17 | 1);
    let widths = [Width::U8, Width::U16, Width::U32, Width::U64];
    // Relaxed: `stop` is a plain flag; nothing is published through it.
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
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
    let bus = IoBus::<Mmio>::new();
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
        bus.len(),
        slots,
        opts.seconds
    );
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
                s.spawn(move || vcpu_loop(bus, v as u32, slots, stop, progress))
            })
            .collect();

        let start = Instant::now();
        let mut last_print = start;
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let run_for = Duration::from_secs_f64(opts.seconds);
        while start.elapsed() < run_for {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
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
                        dev.valid[1].store(NONE, Ordering::Relaxed);
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

    let device_violations = violations.load(Ordering::Relaxed);
    let misrouted: u64 = vcpu_stats.iter().map(|s| s.misrouted).sum();
    let ok = device_violations == 0 && misrouted == 0 && total > 0;
    println!(
        "integrity: {} ({misrouted} misrouted accesses, {device_violations} calls outside a device's ownership or after its unplug)",
        if ok { "PASS" } else { "FAIL" }
    );
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

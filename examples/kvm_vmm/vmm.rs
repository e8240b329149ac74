//! Putting the VM together: options, KVM setup, devices, boot, threads, and
//! the report printed at the end.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::console::Console;
use crate::devices;
use crate::hotplug::{self, HotplugStats};
use crate::irq::IrqfdController;
use crate::memory::Ram;
use crate::notify::{self, Notifiers};
use crate::vcpu::{self, DiskWatch, EXIT_KINDS, Outcome, RunState, Shared, VcpuStats};
use crate::{boot, mptable};

/// The kernel command line: the serial console, the first disk as a
/// read-write ext4 root, reset on panic through the keyboard controller,
/// and the CPU features this host's KVM cannot emulate kept off.
const CMDLINE: &str = "console=ttyS0 root=/dev/vda rw rootfstype=ext4 panic=-1 reboot=k \
                       noxsave clearcpuid=151,308";

/// KVM's TSS and identity-map pages: below the 4 GiB boundary, above
/// everything else.
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

struct Options {
    kernel: String,
    config: String,
    disks: Vec<(String, String)>,
    mem_mib: u64,
    vcpus: usize,
    cmdline: String,
    initrd: Option<String>,
    timeout: Duration,
    hotplug: Option<Duration>,
    inline: bool,
    sample: Option<Duration>,
}

const USAGE: &str = "usage: kvm_vmm --kernel VMLINUX [--config vm.toml] [--disk NAME=IMAGE]... \
[--vcpus N] [--mem MIB] [--append ARGS] [--cmdline ARGS] [--initrd FILE] [--timeout SECS] \
[--hotplug-ms MS (0: off)] [--inline-notify] [--sample-ms MS (profile guest RIPs)]";

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        kernel: String::new(),
        config: concat!(env!("CARGO_MANIFEST_DIR"), "/examples/kvm_vmm/vm.toml").into(),
        disks: Vec::new(),
        mem_mib: 256,
        vcpus: 1,
        cmdline: CMDLINE.into(),
        initrd: None,
        timeout: Duration::from_secs(600),
        hotplug: Some(Duration::from_millis(100)),
        inline: false,
        sample: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--kernel" => o.kernel = value()?,
            "--config" => o.config = value()?,
            "--disk" => {
                let v = value()?;
                let (name, path) = v.split_once('=').ok_or("--disk takes NAME=IMAGE")?;
                o.disks.push((name.into(), path.into()));
            }
            "--mem" => o.mem_mib = value()?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--vcpus" => o.vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--append" => {
                o.cmdline.push(' ');
                o.cmdline.push_str(&value()?);
            }
            "--cmdline" => o.cmdline = value()?,
            "--initrd" => o.initrd = Some(value()?),
            "--timeout" => {
                let s: f64 = value()?.parse().map_err(|e| format!("--timeout: {e}"))?;
                o.timeout =
                    Duration::try_from_secs_f64(s).map_err(|e| format!("--timeout: {e}"))?;
            }
            "--hotplug-ms" => {
                let ms: u64 = value()?.parse().map_err(|e| format!("--hotplug-ms: {e}"))?;
                o.hotplug = (ms > 0).then(|| Duration::from_millis(ms));
            }
            "--inline-notify" => o.inline = true,
            "--sample-ms" => {
                let ms: u64 = value()?.parse().map_err(|e| format!("--sample-ms: {e}"))?;
                o.sample = (ms > 0).then(|| Duration::from_millis(ms));
            }
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if o.kernel.is_empty() {
        return Err(format!("--kernel is required\n{USAGE}"));
    }
    if o.vcpus == 0 || o.vcpus > mptable::MAX_CPUS {
        return Err(format!("--vcpus: 1 to {}", mptable::MAX_CPUS));
    }
    // Guest RAM must end below the MMIO area the devices use.
    if !(64..=3072).contains(&o.mem_mib) {
        return Err("--mem: 64 to 3072 MiB".into());
    }
    Ok(o)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

pub fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("kvm_vmm: cannot open /dev/kvm: {e}");
            return ExitCode::from(77);
        }
    };
    match run(&o, &kvm) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kvm_vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds and runs the VM; `Ok(true)` when the guest reset it cleanly.
fn run(o: &Options, kvm: &Kvm) -> Result<bool, String> {
    let start = Instant::now();
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(format!("this KVM lacks {name}"));
        }
    }
    let vm = Arc::new(kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?);
    vm.set_tss_address(TSS_ADDR).map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?;
    vm.set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(|e| format!("KVM_SET_IDENTITY_MAP_ADDR: {e}"))?;
    vm.create_irq_chip().map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(|e| format!("KVM_CREATE_PIT2: {e}"))?;
    let ram = Arc::new(Ram::new(&vm, o.mem_mib << 20)?);

    // Devices.
    let console = Arc::new(Console::new(start));
    let runstate = Arc::new(RunState::new());
    let interrupts = Arc::new(IrqfdController::new(vm.clone()));
    let config = devices::load_config(&o.config, &o.disks)?;
    let on_reset = {
        let runstate = runstate.clone();
        Arc::new(move || runstate.finish(Outcome::Reset))
    };
    let devs =
        devices::build(&config, ram.for_devices(), interrupts.clone(), console.clone(), on_reset)?;
    if devs.disks.is_empty() {
        return Err(format!("{}: no virtio-blk disk to boot from", o.config));
    }
    let notifiers = if o.inline {
        Notifiers::inline()
    } else {
        notify::wire(&vm, &devs.disks).map_err(|e| format!("queue notifiers: {e}"))?
    };

    // Boot.
    let entry = boot::load_kernel(&ram, &o.kernel)?;
    let initrd =
        o.initrd.as_deref().map(|p| boot::load_initrd(&ram, p, entry.kernel_end)).transpose()?;
    let cmdline = format!("{}{}", o.cmdline, devices::cmdline_entries(&devs.disks));
    boot::write_boot_params(&ram, &cmdline, initrd)?;
    mptable::write(&ram, boot::EBDA_START, o.vcpus)?;
    let mut vcpus = Vec::new();
    for id in 0..o.vcpus {
        // `o.vcpus <= MAX_CPUS` (32) was checked.
        vcpus.push(vcpu::create(kvm, &vm, id as u8, o.vcpus as u8)?);
    }
    boot::setup_boot_vcpu(&vcpus[0], &ram, &entry)?;
    eprintln!(
        "kvm_vmm: {} vCPU(s), {} MiB, kernel {} (PVH entry {:#x}), {} device(s), notify {}",
        o.vcpus,
        o.mem_mib,
        o.kernel,
        entry.pvh_entry,
        devs.manager.devices().len(),
        notifiers.mode()
    );
    eprintln!("kvm_vmm: command line: {cmdline}");

    // Run.
    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| format!("signal handler: {e}"))?;
    let shared = Arc::new(Shared {
        manager: devs.manager.clone(),
        ram: ram.clone(),
        console: console.clone(),
        disks: devs.disks.iter().map(|d| DiskWatch::new(d.base, d.length)).collect(),
        run: runstate.clone(),
        virtio_seen: AtomicBool::new(false),
    });
    let mut threads = Vec::new();
    for (id, fd) in vcpus.into_iter().enumerate() {
        let shared = shared.clone();
        let t = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run(id as u32, fd, &shared))
            .map_err(|e| format!("vcpu thread: {e}"))?;
        threads.push(t);
    }
    let hotplug = o
        .hotplug
        .map(|period| {
            let (manager, runstate) = (devs.manager.clone(), runstate.clone());
            thread::Builder::new()
                .name("hotplug".into())
                .spawn(move || hotplug::run(manager, runstate, period))
        })
        .transpose()
        .map_err(|e| format!("hot-plug thread: {e}"))?;

    let outcome = match o.sample {
        None => runstate.wait(o.timeout),
        Some(period) => {
            // Profiling: interrupt the vCPUs now and then; each records the
            // guest RIP it was interrupted at.
            let deadline = Instant::now() + o.timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if runstate.stopping() || left.is_zero() {
                    break runstate.wait(Duration::ZERO);
                }
                thread::sleep(period.min(left));
                for t in threads.iter().filter(|t| !t.is_finished()) {
                    let _ = t.kill(SIGRTMIN());
                }
            }
        }
    };
    let stopped = start.elapsed();
    // Kick every vCPU out of KVM_RUN until its thread ends (a kick that
    // lands just before KVM_RUN is entered is missed, hence the repeats).
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(SIGRTMIN());
        }
        thread::sleep(Duration::from_millis(5));
    }
    let stats: Vec<VcpuStats> = threads
        .into_iter()
        .map(|t| t.join().map_err(|_| "a vCPU thread panicked".to_string()))
        .collect::<Result<_, _>>()?;
    let hotplug =
        hotplug.map(|t| t.join().map_err(|_| "the hot-plug thread panicked")).transpose()?;
    let served = notifiers.shutdown();

    report(&Report {
        outcome: &outcome,
        stopped,
        console: &console,
        stats: &stats,
        shared: &shared,
        disks: &devs.disks,
        interrupts: &interrupts,
        served,
        hotplug: hotplug.as_ref(),
    });
    Ok(outcome == Outcome::Reset)
}

struct Report<'a> {
    outcome: &'a Outcome,
    stopped: Duration,
    console: &'a Console,
    stats: &'a [VcpuStats],
    shared: &'a Shared,
    disks: &'a [devices::Disk],
    interrupts: &'a IrqfdController,
    served: Vec<(String, u64)>,
    hotplug: Option<&'a HotplugStats>,
}

fn report(r: &Report<'_>) {
    let secs = |d: Duration| d.as_secs_f64();
    println!();
    println!("==== kvm_vmm report ====");
    let how = match r.outcome {
        Outcome::Reset => "the guest reset the machine through the i8042 port (clean exit)".into(),
        Outcome::Shutdown(s) => format!("shutdown: {s}"),
        Outcome::Timeout => "time bound reached, VM stopped by the VMM".into(),
        Outcome::Failed(s) => format!("failed: {s}"),
    };
    println!("outcome: {how}, after {:.2} s", secs(r.stopped));
    println!("milestones (seconds after VMM start):");
    for m in r.console.reached() {
        println!("  {:>8.2}  {:<30} {}", secs(m.at), m.label, m.line);
    }
    let mut exits = [0u64; EXIT_KINDS.len()];
    for s in r.stats {
        for (sum, n) in exits.iter_mut().zip(s.exits) {
            *sum += n;
        }
    }
    let kinds: Vec<String> = EXIT_KINDS
        .iter()
        .zip(exits)
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("exits by kind (all vCPUs): {}", kinds.join(", "));
    for (id, s) in r.stats.iter().enumerate() {
        let n: u64 = s.exits.iter().sum();
        let rip = s.final_rip.map_or_else(|| "?".into(), |r| format!("{r:#x}"));
        println!("  vcpu {id}: {n} exits in {:.2} s, stopped at rip {rip}", secs(s.total));
        if !s.samples.is_empty() {
            let mut top: Vec<(u64, u64)> = s.samples.iter().map(|(&a, &n)| (a, n)).collect();
            top.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
            let top: Vec<String> =
                top.iter().take(12).map(|(a, n)| format!("{a:#x} x{n}")).collect();
            println!("    RIP samples: {}", top.join(", "));
        }
    }
    let total: Duration = r.stats.iter().map(|s| s.total).sum();
    let dispatch: Duration = r.stats.iter().map(|s| s.dispatch).sum();
    let dispatched: u64 = r.stats.iter().map(|s| s.exits[..4].iter().sum::<u64>()).sum();
    println!(
        "vmio dispatch: {:.6} s of {:.2} s vCPU time ({:.4} %), {} dispatches, {:.2} us each",
        secs(dispatch),
        secs(total),
        100.0 * secs(dispatch) / secs(total).max(1e-9),
        dispatched,
        1e6 * secs(dispatch) / (dispatched.max(1) as f64)
    );
    for (disk, watch) in r.disks.iter().zip(&r.shared.disks) {
        let queues = watch.served(&r.shared.ram);
        let n: u64 = queues.iter().map(|&(_, n)| u64::from(n)).sum();
        let per: Vec<String> = queues.iter().map(|(q, n)| format!("q{q} {n}")).collect();
        println!(
            "disk {}: {} sectors, {} requests served ({}), driver status {:#x}",
            disk.name,
            disk.transport.device().capacity(),
            n,
            if per.is_empty() { "no queue set up".into() } else { per.join(", ") },
            disk.transport.status()
        );
    }
    for (name, n) in &r.served {
        println!("  {name}: {n} queue notifications taken by its worker (ioeventfd)");
    }
    let irqs: Vec<String> =
        r.interrupts.pulses().iter().map(|(irq, n)| format!("irq {irq}: {n}")).collect();
    println!("interrupts injected through irqfd: {}", irqs.join(", "));
    let mut unmapped = std::collections::BTreeMap::new();
    for s in r.stats {
        for (k, n) in &s.unmapped {
            *unmapped.entry(*k).or_insert(0u64) += n;
        }
    }
    if unmapped.is_empty() {
        println!("unmapped accesses: none");
    } else {
        let list: Vec<String> = unmapped
            .iter()
            .map(|((bus, a, w), n)| {
                format!("{bus} {} {a:#x} x{n}", if *w { "write" } else { "read" })
            })
            .collect();
        println!("unmapped accesses: {}", list.join(", "));
    }
    let refused: u64 = r.stats.iter().map(|s| s.refused).sum();
    if refused > 0 {
        println!("accesses refused by devices: {refused}");
    }
    match r.hotplug {
        Some(h) => {
            println!(
                "hot-plug: {} edits ({} plugged, {} removed) in {} rounds, hidden disk plugged {} times, {} dispatch checks passed, {} failed",
                h.edits(),
                h.plugged,
                h.removed,
                h.rounds,
                h.hidden_disk_rounds,
                h.checks,
                h.failures.len()
            );
            for f in &h.failures {
                println!("  hot-plug check failed: {f}");
            }
        }
        None => println!("hot-plug: off"),
    }
}

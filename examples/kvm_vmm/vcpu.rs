//! The vCPU threads: configure each vCPU, then run the exit loop that turns
//! every `KVM_EXIT_MMIO` / `KVM_EXIT_IO` into a vmio dispatch through the
//! thread's own `VcpuIo`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET,
};

/// CPUID leaf of KVM's paravirtual feature bits, and the PV send-IPI bit
/// (Linux's arch/x86/include/uapi/asm/kvm_para.h).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmio::{DeviceManager, DispatchError, VcpuIo, Width};

use crate::console::Console;
use crate::memory::Ram;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reset the machine through the i8042 port: a clean end.
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN) or KVM reported a system event.
    Shutdown(String),
    /// The run hit the time bound.
    Timeout,
    /// Something the VMM cannot continue from.
    Failed(String),
}

/// The run's stop flag and outcome, shared by every thread.
pub struct RunState {
    stop: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
}

impl RunState {
    pub fn new() -> Self {
        RunState { stop: AtomicBool::new(false), outcome: Mutex::new(None), done: Condvar::new() }
    }

    /// Ends the run with `outcome` unless it already ended.
    pub fn finish(&self, outcome: Outcome) {
        let mut o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            *o = Some(outcome);
        }
        // Release: pairs with the Acquire in `stopping`; a thread that sees
        // the flag finds the outcome set.
        self.stop.store(true, Ordering::Release);
        self.done.notify_all();
    }

    /// Whether the run is ending.
    pub fn stopping(&self) -> bool {
        // Acquire: pairs with the Release in `finish`.
        self.stop.load(Ordering::Acquire)
    }

    /// Waits until the run ends or `timeout` passes (then ends it).
    pub fn wait(&self, timeout: Duration) -> Outcome {
        let o = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let (mut o, _) = self
            .done
            .wait_timeout_while(o, timeout, |o| o.is_none())
            .unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            *o = Some(Outcome::Timeout);
            // Release: as in `finish`.
            self.stop.store(true, Ordering::Release);
        }
        o.clone().expect("set above")
    }
}

/// Exit kinds the report counts.
pub const EXIT_KINDS: [&str; 8] = [
    "mmio-read",
    "mmio-write",
    "io-in",
    "io-out",
    "int3 (emulation gap)",
    "signal (kick)",
    "shutdown/system",
    "other",
];
const MMIO_READ: usize = 0;
const MMIO_WRITE: usize = 1;
const IO_IN: usize = 2;
const IO_OUT: usize = 3;
const INT3: usize = 4;
const KICK: usize = 5;
const SHUTDOWN: usize = 6;
const OTHER: usize = 7;

/// What one vCPU thread measured.
#[derive(Default)]
pub struct VcpuStats {
    pub exits: [u64; EXIT_KINDS.len()],
    /// Wall time of the whole loop (in and out of KVM_RUN).
    pub total: Duration,
    /// Wall time inside vmio dispatch calls.
    pub dispatch: Duration,
    /// Accesses nobody owns: (bus, address, write) → count.
    pub unmapped: BTreeMap<(&'static str, u64, bool), u64>,
    /// Accesses a device refused or that straddled a device's end.
    pub refused: u64,
    /// Where the vCPU was when its loop ended.
    pub final_rip: Option<u64>,
    /// Guest RIPs seen when kicked (`--sample-ms`): address → count.
    pub samples: BTreeMap<u64, u64>,
}

/// Observes the queue setup the guest writes to each disk, to read the used
/// rings' indices (requests completed) at the end.
pub struct DiskWatch {
    pub base: u64,
    pub length: u64,
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    queue_sel: u32,
    /// Queue → (used ring low, high) as programmed by the driver.
    used: BTreeMap<u32, (u32, u32)>,
}

const QUEUE_SEL: u64 = 0x030;
const QUEUE_USED_LOW: u64 = 0x0a0;
const QUEUE_USED_HIGH: u64 = 0x0a4;

impl DiskWatch {
    pub fn new(base: u64, length: u64) -> Self {
        DiskWatch { base, length, state: Mutex::new(WatchState::default()) }
    }

    fn contains(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.base) < self.length
    }

    fn observe_write(&self, addr: u64, value: u64) {
        let off = addr - self.base;
        if !matches!(off, QUEUE_SEL | QUEUE_USED_LOW | QUEUE_USED_HIGH) {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let sel = s.queue_sel;
        let value = value as u32;
        match off {
            QUEUE_SEL => s.queue_sel = value,
            QUEUE_USED_LOW => s.used.entry(sel).or_default().0 = value,
            _ => s.used.entry(sel).or_default().1 = value,
        }
    }

    /// Requests completed per queue: each used ring's `idx` (the count of
    /// used elements the device published, modulo 2^16).
    pub fn served(&self, ram: &Ram) -> Vec<(u32, u16)> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.used
            .iter()
            .filter_map(|(&q, &(lo, hi))| {
                let at = (u64::from(hi) << 32 | u64::from(lo)).checked_add(2)?;
                let idx: u16 = ram.0.read_obj(GuestAddress(at)).ok()?;
                Some((q, idx))
            })
            .collect()
    }
}

/// What every vCPU thread shares.
pub struct Shared {
    pub manager: Arc<DeviceManager>,
    pub ram: Arc<Ram>,
    pub console: Arc<Console>,
    pub disks: Vec<DiskWatch>,
    pub run: Arc<RunState>,
    /// Set by the first access to any disk window (a boot milestone).
    pub virtio_seen: AtomicBool,
}

/// Creates and configures vCPU `id`: CPUID with its APIC id, LINT0 as
/// ExtINT and LINT1 as NMI in its local APIC (as firmware leaves them),
/// FPU defaults.
pub fn create(kvm: &Kvm, vm: &kvm_ioctls::VmFd, id: u8, cpus: u8) -> Result<VcpuFd, String> {
    let vcpu = vm.create_vcpu(u64::from(id)).map_err(|e| format!("KVM_CREATE_VCPU {id}: {e}"))?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            // Initial APIC id and logical processor count.
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                // Hypervisor present.
                entry.ecx |= 1 << 31;
            }
            // x2APIC id.
            0xb => entry.edx = u32::from(id),
            // KVM's paravirtual features: no PV send-IPI. On the nested,
            // software-assisted KVM this was developed on, a vCPU making
            // that hypercall was found stuck in it (Linux uses it as soon
            // as there are two CPUs) while the other spun on a lock, and
            // SMP bring-up never finished. Ordinary APIC IPIs work
            // everywhere; the hypercall only saves exits.
            KVM_CPUID_FEATURES => entry.eax &= !(1 << KVM_FEATURE_PV_SEND_IPI),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
    let mut lapic = vcpu.get_lapic().map_err(|e| format!("KVM_GET_LAPIC: {e}"))?;
    set_lvt(&mut lapic.regs, 0x350, 0x7); // LINT0: ExtINT
    set_lvt(&mut lapic.regs, 0x360, 0x4); // LINT1: NMI
    vcpu.set_lapic(&lapic).map_err(|e| format!("KVM_SET_LAPIC: {e}"))?;
    crate::boot::setup_fpu(&vcpu)?;
    Ok(vcpu)
}

/// Sets the delivery mode (bits 8–10) of the LVT register at `offset`.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

fn width(len: usize) -> Option<Width> {
    Width::try_from(len).ok()
}

fn to_bytes(value: u64, data: &mut [u8]) {
    let n = data.len().min(8);
    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
}

fn from_bytes(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// The per-thread half of the exit loop.
struct Loop<'a> {
    id: u32,
    io: VcpuIo,
    shared: &'a Shared,
    stats: VcpuStats,
    refusals_logged: u32,
}

impl Loop<'_> {
    /// A read the bus could not serve: count it, answer all ones.
    fn read_failed(&mut self, bus: &'static str, addr: u64, e: DispatchError) -> u64 {
        self.failed(bus, addr, false, e);
        u64::MAX
    }

    fn failed(&mut self, bus: &'static str, addr: u64, write: bool, e: DispatchError) {
        match e {
            e if e.is_unmapped() => {
                *self.stats.unmapped.entry((bus, addr, write)).or_default() += 1;
            }
            e => {
                self.stats.refused += 1;
                if self.refusals_logged < 16 {
                    self.refusals_logged += 1;
                    eprintln!("kvm_vmm: vcpu {}: {bus} access at {addr:#x} refused: {e}", self.id);
                }
            }
        }
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.stats.exits[MMIO_READ] += 1;
        self.note_virtio(addr);
        let Some(w) = width(data.len()) else { return data.fill(0xff) };
        let t = Instant::now();
        let r = self.io.handle_mmio_read(addr, w);
        self.stats.dispatch += t.elapsed();
        let v = r.unwrap_or_else(|e| self.read_failed("mmio", addr, e));
        to_bytes(v, data);
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.stats.exits[MMIO_WRITE] += 1;
        self.note_virtio(addr);
        let Some(w) = width(data.len()) else { return };
        let value = from_bytes(data);
        let t = Instant::now();
        let r = self.io.handle_mmio_write(addr, w, value);
        self.stats.dispatch += t.elapsed();
        if let Err(e) = r {
            self.failed("mmio", addr, true, e);
        }
        if let Some(disk) = self.shared.disks.iter().find(|d| d.contains(addr)) {
            disk.observe_write(addr, value);
        }
    }

    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        self.stats.exits[IO_IN] += 1;
        let Some(w) = width(data.len()) else { return data.fill(0xff) };
        let t = Instant::now();
        let r = self.io.handle_port_read(port, w);
        self.stats.dispatch += t.elapsed();
        let v = r.unwrap_or_else(|e| self.read_failed("pio", port.into(), e));
        to_bytes(v, data);
    }

    fn io_out(&mut self, port: u16, data: &[u8]) {
        self.stats.exits[IO_OUT] += 1;
        let Some(w) = width(data.len()) else { return };
        let t = Instant::now();
        let r = self.io.handle_port_write(port, w, from_bytes(data));
        self.stats.dispatch += t.elapsed();
        if let Err(e) = r {
            self.failed("pio", port.into(), true, e);
        }
    }

    /// The first access to a disk's registers is a boot milestone.
    fn note_virtio(&self, addr: u64) {
        // Relaxed: a once-only flag guarding a milestone record; the
        // console's lock orders the record itself.
        if !self.shared.virtio_seen.load(Ordering::Relaxed)
            && self.shared.disks.iter().any(|d| d.contains(addr))
            && !self.shared.virtio_seen.swap(true, Ordering::Relaxed)
        {
            self.shared
                .console
                .mark("first virtio-mmio access", &format!("vcpu {} at {addr:#x}", self.id));
        }
    }
}

/// The byte at the vCPU's instruction pointer, if KVM reported it or the
/// guest's page tables map it.
fn byte_at_rip(vcpu: &VcpuFd, ram: &Ram, reported: Option<u8>) -> Option<u8> {
    if reported.is_some() {
        return reported;
    }
    let regs = vcpu.get_regs().ok()?;
    let sregs = vcpu.get_sregs().ok()?;
    let t = vcpu.translate_gva(sregs.cs.base.wrapping_add(regs.rip)).ok()?;
    if t.valid == 0 {
        return None;
    }
    ram.0.read_obj(GuestAddress(t.physical_address)).ok()
}

/// Does what the CPU would have done for an INT3 the emulator refused: the
/// breakpoint is a trap, so RIP moves past the one-byte instruction and #BP
/// (vector 3, no error code) is delivered with that RIP.
fn inject_breakpoint(vcpu: &VcpuFd) -> Result<(), String> {
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = regs.rip.wrapping_add(1);
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let mut events = vcpu.get_vcpu_events().map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
    events.exception.injected = 1;
    events.exception.pending = 0;
    events.exception.nr = 3;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    // No optional field (NMI pending, SIPI vector, shadow, SMM) is set.
    events.flags = 0;
    vcpu.set_vcpu_events(&events).map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))
}

/// Runs vCPU `id` until the run stops; returns what it measured.
pub fn run(id: u32, mut vcpu: VcpuFd, shared: &Shared) -> VcpuStats {
    let start = Instant::now();
    let mut l = Loop {
        id,
        io: shared.manager.vcpu(id),
        shared,
        stats: VcpuStats::default(),
        refusals_logged: 0,
    };
    while !shared.run.stopping() {
        match vcpu.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => l.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => l.mmio_write(addr, data),
            Ok(VcpuExit::IoIn(port, data)) => l.io_in(port, data),
            Ok(VcpuExit::IoOut(port, data)) => l.io_out(port, data),
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for
                // which KVM fills the `internal` member of the exit union;
                // it is plain integers, valid for any bit pattern.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                // For an emulation failure, `data[0]` holds the flags and,
                // when they say so, `data[1]` the instruction length (low
                // byte) and first bytes (emulation_failure layout).
                let reported = (internal.suberror == KVM_INTERNAL_ERROR_EMULATION
                    && internal.ndata >= 2
                    && internal.data[0]
                        & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                        != 0
                    && internal.data[1] & 0xff != 0)
                    .then(|| (internal.data[1] >> 8) as u8);
                let is_int3 = internal.suberror == KVM_INTERNAL_ERROR_EMULATION
                    && byte_at_rip(&vcpu, &shared.ram, reported) == Some(0xcc);
                if !is_int3 {
                    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    shared.run.finish(Outcome::Failed(format!(
                        "vcpu {id}: KVM internal error, suberror {}, rip {rip:#x}, data {:x?}",
                        internal.suberror,
                        &internal.data[..(internal.ndata as usize).min(16)]
                    )));
                    break;
                }
                l.stats.exits[INT3] += 1;
                if let Err(e) = inject_breakpoint(&vcpu) {
                    shared.run.finish(Outcome::Failed(format!("vcpu {id}: INT3: {e}")));
                    break;
                }
            }
            Ok(VcpuExit::Shutdown) => {
                l.stats.exits[SHUTDOWN] += 1;
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                shared.run.finish(Outcome::Shutdown(format!(
                    "vcpu {id}: triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}"
                )));
                break;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                l.stats.exits[SHUTDOWN] += 1;
                let what = if kind == KVM_SYSTEM_EVENT_RESET { "reset" } else { "shutdown" };
                shared.run.finish(Outcome::Shutdown(format!("vcpu {id}: system event: {what}")));
                break;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                shared.run.finish(Outcome::Failed(format!(
                    "vcpu {id}: KVM_EXIT_FAIL_ENTRY, reason {reason:#x} on cpu {cpu}"
                )));
                break;
            }
            Ok(_) => l.stats.exits[OTHER] += 1,
            Err(e) if e.errno() == libc::EINTR => {
                l.stats.exits[KICK] += 1;
                vcpu.set_kvm_immediate_exit(0);
                if !shared.run.stopping()
                    && let Ok(regs) = vcpu.get_regs()
                {
                    *l.stats.samples.entry(regs.rip).or_default() += 1;
                }
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => {
                shared.run.finish(Outcome::Failed(format!("vcpu {id}: KVM_RUN: {e}")));
                break;
            }
        }
    }
    l.stats.total = start.elapsed();
    l.stats.final_rip = vcpu.get_regs().ok().map(|r| r.rip);
    l.stats
}

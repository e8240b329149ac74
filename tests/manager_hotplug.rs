//! Hot-plug under load at the manager level: vCPU threads keep dispatching
//! through `VcpuIo` while a hot-plug thread adds, moves and removes devices
//! by name. Nothing may be misrouted (a device is only ever reached at a
//! start it owns, never after its unplug completed) and nothing may be lost
//! (every acknowledged write reached exactly one device).

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use vmio::{Access, Built, Device, DeviceConfig, DeviceError, DeviceKinds, DeviceManager, Width};

const BASE: u64 = 0x4000_0000;
const SLOT: u64 = 0x1000;
const SLOTS: u64 = 16;
const NONE: u64 = u64::MAX;

struct Tagged {
    serial: u64,
    /// Starts the device may be reached at: current, and the previous one
    /// while a move's grace period is open.
    valid: [AtomicU64; 2],
    retired: AtomicBool,
    writes: AtomicU64,
    violations: Arc<AtomicU64>,
}

impl Tagged {
    fn check(&self, a: Access) {
        // The hot-plug thread changes `valid`/`retired` only before an edit
        // is published or after its grace period, and the bus's epoch
        // protocol orders both against this call. Within a settle step
        // (`valid = [new, NONE]` after `[old, new]`) it stores `valid[0]`
        // then `valid[1]` with Release, so reading `valid[1]` first with
        // Acquire can never see the start in neither slot.
        let start = a.addr - a.offset;
        let second = self.valid[1].load(Ordering::Acquire);
        let first = self.valid[0].load(Ordering::Relaxed);
        let owned = start == first || start == second;
        if !owned || self.retired.load(Ordering::Relaxed) {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Device for Tagged {
    fn read(&self, a: Access) -> Result<u64, DeviceError> {
        self.check(a);
        Ok(self.serial << 32 | a.offset)
    }
    fn write(&self, a: Access, _: u64) -> Result<(), DeviceError> {
        self.check(a);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[test]
fn add_move_remove_by_name_while_vcpus_dispatch() {
    let edits = if cfg!(miri) { 40 } else { 800 };
    let violations = Arc::new(AtomicU64::new(0));
    let all: Arc<Mutex<Vec<Arc<Tagged>>>> = Arc::default();
    let mut kinds = DeviceKinds::default();
    {
        let (violations, all) = (violations.clone(), all.clone());
        kinds.register("tagged", &["serial"], move |env| {
            let cfg = env.config;
            let serial = cfg.param_u64("serial")?.ok_or_else(|| cfg.missing("serial"))?;
            let dev = Arc::new(Tagged {
                serial,
                valid: [AtomicU64::new(cfg.base), AtomicU64::new(NONE)],
                retired: AtomicBool::new(false),
                writes: AtomicU64::new(0),
                violations: violations.clone(),
            });
            all.lock().unwrap().push(dev.clone());
            Ok(Built::new(vmio::Space::Mmio, dev))
        });
    }
    let m = DeviceManager::builder().kinds(kinds).build_empty();
    let stop = AtomicBool::new(false);

    let (acked, misrouted) = thread::scope(|s| {
        let vcpus: Vec<_> = (0..2u32)
            .map(|v| {
                let (m, stop) = (&m, &stop);
                s.spawn(move || {
                    let mut io = m.vcpu(v);
                    let (mut acked, mut misrouted, mut n) = (0u64, 0u64, 0u64);
                    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ u64::from(v + 1));
                    // Relaxed: a plain stop flag.
                    while !stop.load(Ordering::Relaxed) || n < 1000 {
                        let rng = rng.next();
                        let offset = (rng >> 8) % (SLOT / 8) * 8;
                        let addr = BASE + (rng >> 20) % SLOTS * SLOT + offset;
                        if rng & 1 == 0 {
                            match io.handle_mmio_read(addr, Width::U32) {
                                Ok(v) if v == offset & 0xffff_ffff => {}
                                Ok(_) => misrouted += 1,
                                Err(e) if e.is_unmapped() => {}
                                Err(_) => misrouted += 1,
                            }
                        } else {
                            match io.handle_mmio_write(addr, Width::U64, rng) {
                                Ok(()) => acked += 1,
                                Err(e) if e.is_unmapped() => {}
                                Err(_) => misrouted += 1,
                            }
                        }
                        n += 1;
                    }
                    (acked, misrouted)
                })
            })
            .collect();

        // The hot-plug thread: this one.
        let mut occupant: Vec<Option<String>> = vec![None; SLOTS as usize];
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
        let mut serial = 0u64;
        for _ in 0..edits {
            let rng = rng.next();
            let slot = ((rng >> 8) % SLOTS) as usize;
            let start = BASE + slot as u64 * SLOT;
            match occupant[slot].clone() {
                None => {
                    serial += 1;
                    let name = format!("dev{serial}");
                    let cfg = DeviceConfig::new(name.clone(), "tagged", start, SLOT)
                        .with_param("serial", serial);
                    m.add(cfg).unwrap();
                    occupant[slot] = Some(name);
                }
                Some(name) if rng.is_multiple_of(3) => {
                    let dev = m.device::<Tagged>(&name).unwrap();
                    m.remove(&name).unwrap().wait().unwrap();
                    // Relaxed: see `Tagged::check`.
                    dev.retired.store(true, Ordering::Relaxed);
                    occupant[slot] = None;
                }
                Some(name) => {
                    let to = ((rng >> 32) % SLOTS) as usize;
                    if occupant[to].is_some() {
                        continue;
                    }
                    let new_start = BASE + to as u64 * SLOT;
                    let dev = m.device::<Tagged>(&name).unwrap();
                    // Relaxed: the move's publish (Release) orders it.
                    dev.valid[1].store(new_start, Ordering::Relaxed);
                    m.move_device(&name, new_start).unwrap().wait().unwrap();
                    // Release: see `Tagged::check`.
                    dev.valid[0].store(new_start, Ordering::Relaxed);
                    dev.valid[1].store(NONE, Ordering::Release);
                    occupant[to] = occupant[slot].take();
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        vcpus.into_iter().map(|h| h.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });

    let received: u64 = all.lock().unwrap().iter().map(|d| d.writes.load(Ordering::Relaxed)).sum();
    assert_eq!(misrouted, 0, "reads answered by the wrong device or refused");
    assert_eq!(violations.load(Ordering::Relaxed), 0, "device reached outside its ownership");
    assert_eq!(acked, received, "acknowledged writes lost or duplicated");
    assert!(acked > 0, "the vCPUs never hit a device");
    let live = m.devices();
    assert_eq!(live.len(), m.mmio().len());
    assert!(live.iter().all(|d| d.config.base >= BASE && d.config.base < BASE + SLOTS * SLOT));
}

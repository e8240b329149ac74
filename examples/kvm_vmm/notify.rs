//! Virtio queue notifications as KVM ioeventfds, served by vmio's queue
//! workers.
//!
//! For each queue `q` of each disk, one `EventFd` is registered with
//! `KVM_IOEVENTFD` at the disk's QueueNotify register (base + 0x50) with
//! datamatch `q`: the guest's `writel(q, QueueNotify)` then signals the
//! eventfd inside KVM and the vCPU goes straight back to the guest, no exit
//! to this process. The same eventfd is the queue's `QueueEvent`: vmio's
//! worker for queue `q` blocks reading it and serves the queue, outside any
//! bus read section, and the completion interrupt goes out through the
//! disk's irqfd line. A notify that does exit (another value, or before the
//! ioeventfd exists) reaches the transport, which in deferred mode signals
//! the same eventfd.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmio::virtio::spec::mmio::QUEUE_NOTIFY;
use vmio::virtio::{QueueEvent, QueueWorkers};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::Disk;

/// A queue's notification signal: a blocking eventfd shared with KVM.
pub struct EventFdQueueEvent {
    fd: EventFd,
    wakes: AtomicU64,
}

impl EventFdQueueEvent {
    fn new() -> io::Result<Self> {
        // Blocking: the worker sleeps in read(2) until a notify arrives.
        Ok(EventFdQueueEvent { fd: EventFd::new(0)?, wakes: AtomicU64::new(0) })
    }

    /// Wake-ups the worker took (coalesced notifications).
    pub fn wakes(&self) -> u64 {
        // Relaxed: a statistic read after the workers were joined.
        self.wakes.load(Ordering::Relaxed)
    }
}

impl QueueEvent for EventFdQueueEvent {
    fn signal(&self) {
        // Adds 1 to the counter; fails only when it would overflow, which
        // cannot happen while a worker keeps reading it.
        let _ = self.fd.write(1);
    }

    fn wait(&self) {
        loop {
            match self.fd.read() {
                Ok(_) => {
                    // Relaxed: a statistic.
                    self.wakes.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A broken eventfd: report once per call and let the
                    // worker serve (harmless) rather than spin hot.
                    eprintln!("kvm_vmm: queue eventfd read: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            }
        }
    }
}

struct Wired {
    name: String,
    workers: QueueWorkers,
    events: Vec<Arc<EventFdQueueEvent>>,
}

/// How queue notifies reach the disks.
pub struct Notifiers {
    wired: Vec<Wired>,
}

impl Notifiers {
    /// Notify writes exit to the VMM and are served on the vCPU thread.
    pub fn inline() -> Self {
        Notifiers { wired: Vec::new() }
    }

    pub fn mode(&self) -> &'static str {
        if self.wired.is_empty() {
            "inline (served on the vCPU thread)"
        } else {
            "ioeventfd + vmio queue workers"
        }
    }

    /// Stops the workers (each serves its queue a last time); returns the
    /// wake-ups each disk's workers took for the guest (the shutdown's own
    /// wake-up not counted).
    pub fn shutdown(self) -> Vec<(String, u64)> {
        self.wired
            .into_iter()
            .map(|w| {
                let wakes = w.events.iter().map(|e| e.wakes()).sum();
                w.workers.shutdown();
                (w.name, wakes)
            })
            .collect()
    }
}

/// Registers an ioeventfd per queue of every disk and starts vmio's
/// workers on them.
pub fn wire(vm: &VmFd, disks: &[Disk]) -> Result<Notifiers, String> {
    let mut wired = Vec::new();
    for disk in disks {
        let queues = disk.transport.num_queues();
        let mut events = Vec::new();
        for q in 0..queues {
            let ev = Arc::new(EventFdQueueEvent::new().map_err(|e| format!("eventfd: {e}"))?);
            let at = IoEventAddress::Mmio(disk.base + QUEUE_NOTIFY);
            vm.register_ioevent(&ev.fd, &at, u32::from(q))
                .map_err(|e| format!("{}: KVM_IOEVENTFD for queue {q}: {e}", disk.name))?;
            events.push(ev);
        }
        let as_events = events.iter().map(|e| e.clone() as Arc<dyn QueueEvent>).collect();
        let workers = QueueWorkers::spawn(disk.transport.clone(), as_events)
            .map_err(|e| format!("{}: queue workers: {e}", disk.name))?;
        wired.push(Wired { name: disk.name.clone(), workers, events });
    }
    Ok(Notifiers { wired })
}

//! The one queue-serving loop the crate's devices run: drain the ring,
//! publish, re-arm notifications, look once more, decide on the interrupt.
//!
//! A device supplies what to do with each chain ([`ChainHandler`]); the loop
//! owns everything the driver can observe — when `used.idx` moves, when
//! notifications are re-armed, when the interrupt is raised, and what a
//! broken ring means — so every device agrees on them:
//!
//! - notifications are off while the ring drains (a driver adding buffers
//!   we are about to find need not exit), back on before the loop ends, and
//!   the ring is checked once more after re-arming: a buffer added between
//!   the last pop and the re-arm was not notified and is found here;
//! - completions are gathered as they finish and written and published
//!   with one `used.idx` store when the ring drains (or every
//!   [`USED_BATCH`] completions on a long drain, so the driver sees
//!   progress);
//! - the interrupt is decided once per serve, after the last publish,
//!   honouring EVENT_IDX / NO_INTERRUPT; re-arming and deciding share one
//!   fence (see the queue's memory-ordering notes);
//! - a malformed chain goes back with length 0 and the queue goes on;
//! - a broken ring publishes what completed before the break, raises the
//!   used-buffer interrupt for it, then asks for a reset; the queue stays
//!   broken (later serves do nothing) until the device is reset;
//! - a stop request ends the serve after the request in progress, with
//!   notifications re-armed (a queue resumed later expects them) and the
//!   rest left in the ring.

use arrayvec::ArrayVec;

use super::queue::{ChainError, DescriptorChain, PopError, QueueError, SplitQueue};
use super::{Interrupt, InterruptCause, QueueStop};
use crate::memory::GuestMemory;

/// Completions written before `used.idx` is published mid-drain.
pub(crate) const USED_BATCH: usize = 32;

/// What a device does with the chains a serve pops.
pub(crate) trait ChainHandler<const N: usize> {
    /// Executes the request `chain` carries; returns the bytes written into
    /// its writable buffers (the used element's `len`).
    fn handle(&mut self, chain: &DescriptorChain<N>) -> u32;

    /// A malformed chain at `head`, about to go back with length 0.
    fn rejected(&mut self, head: u16, error: ChainError) {
        let _ = (head, error);
    }
}

/// Serves queue `index` until its ring is empty or `stop` is requested,
/// popping into `chain` (reused: nothing is moved per request).
///
/// # Errors
/// The error that broke the queue (or failed a used-ring access); the
/// driver was already told to reset the device.
pub(crate) fn serve_queue<const N: usize, M: GuestMemory + ?Sized>(
    queue: &mut SplitQueue,
    mem: &M,
    irq: &dyn Interrupt,
    index: u16,
    stop: &QueueStop,
    chain: &mut DescriptorChain<N>,
    handler: &mut impl ChainHandler<N>,
) -> Result<(), QueueError> {
    if queue.is_broken() {
        return Ok(());
    }
    let first_used = queue.next_used();
    // Completions wait here, heads still in flight, until one `push_batch`
    // writes and publishes them: a head the driver makes available again
    // before its completion was written is caught as in flight.
    let mut used = ArrayVec::<(u16, u32), USED_BATCH>::new();
    let mut result = queue.disable_notification(mem);
    while result.is_ok() {
        if stop.is_requested() {
            // The rest stays in the ring; a resumed queue expects
            // notifications. What completed is published below.
            result = queue.enable_notification(mem).map(drop);
            break;
        }
        let completion = match queue.pop_into(mem, chain) {
            Ok(true) => (chain.head(), handler.handle(chain)),
            Ok(false) => {
                // Drained: publish, re-arm, and look once more.
                if !used.is_empty() {
                    result = queue.push_batch(mem, &used);
                    used.clear();
                    if result.is_err() {
                        break;
                    }
                }
                match queue.enable_notification(mem) {
                    Ok(false) => break,
                    Ok(true) => result = queue.disable_notification(mem),
                    Err(e) => result = Err(e),
                }
                continue;
            }
            Err(PopError::Chain { head, error }) => {
                // Malformed beyond finding a status byte: hand the buffers
                // back untouched and go on with the queue.
                handler.rejected(head, error);
                (head, 0)
            }
            Err(PopError::Queue(e)) => {
                result = Err(e);
                break;
            }
        };
        used.push(completion);
        if used.is_full() {
            // Whatever the outcome, these heads are not pushed twice.
            result = queue.push_batch(mem, &used);
            used.clear();
        }
    }
    // Requests executed before a ring-breaking entry still complete: a
    // broken queue takes back the chains popped before the break.
    if !used.is_empty()
        && let Err(e) = queue.push_batch(mem, &used)
    {
        result = result.and(Err(e));
    }
    if queue.is_broken() {
        // No interrupt suppression to consult on a broken ring: tell the
        // driver about what was published, then about the breakage.
        if queue.next_used() != first_used {
            irq.raise(InterruptCause::UsedBuffer { queue: index });
        }
        irq.needs_reset();
        return Err(result.err().unwrap_or(QueueError::Broken));
    }
    match queue.needs_interrupt(mem) {
        Ok(true) => irq.raise(InterruptCause::UsedBuffer { queue: index }),
        Ok(false) => {}
        Err(e) => result = result.and(Err(e)),
    }
    if result.is_err() {
        irq.needs_reset();
    }
    result
}

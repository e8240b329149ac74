//! A device wrapper that forwards every call to the device it wraps and lets
//! a test step in around the queue calls: time a serve, count lifecycle
//! calls, serialize the queues behind one lock.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::virtio::{ActivateError, Activation, QueueStop, VirtioDevice};

/// What an [`Intercept`] does instead of forwarding a queue call. Each
/// method gets the wrapped device and, by default, just forwards the call;
/// a hook overrides the calls it wants to watch and forwards them itself.
pub trait ServeHook: Send + Sync {
    /// Called for [`VirtioDevice::serve`].
    fn serve<D: VirtioDevice + ?Sized>(&self, device: &D, queue: u16, stop: &QueueStop) {
        device.serve(queue, stop)
    }

    /// Called for [`VirtioDevice::queue_stopped`].
    fn queue_stopped<D: VirtioDevice + ?Sized>(&self, device: &D, queue: u16) {
        device.queue_stopped(queue)
    }

    /// Called for [`VirtioDevice::queue_started`].
    fn queue_started<D: VirtioDevice + ?Sized>(&self, device: &D, queue: u16) {
        device.queue_started(queue)
    }
}

/// `device` with `hook` around its queue calls; every other call goes
/// straight to `device`.
///
/// # Example
/// ```
/// use vmio::testing::{CountCalls, EchoDevice, Intercept};
/// use vmio::virtio::{QueueStop, VirtioDevice};
///
/// let dev = Intercept { device: EchoDevice::new(1), hook: CountCalls::default() };
/// assert_eq!(dev.num_queues(), 1);
/// dev.serve(0, &QueueStop::new());
/// assert_eq!(dev.hook.serves(), 1);
/// ```
#[derive(Debug, Default)]
pub struct Intercept<D, H> {
    /// The device every call goes to.
    pub device: D,
    /// What happens around its queue calls.
    pub hook: H,
}

impl<D: VirtioDevice, H: ServeHook> VirtioDevice for Intercept<D, H> {
    fn device_type(&self) -> u32 {
        self.device.device_type()
    }
    fn vendor_id(&self) -> u32 {
        self.device.vendor_id()
    }
    fn features(&self) -> u64 {
        self.device.features()
    }
    fn num_queues(&self) -> u16 {
        self.device.num_queues()
    }
    fn max_queue_size(&self, queue: u16) -> u16 {
        self.device.max_queue_size(queue)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data)
    }
    fn write_config(&self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data)
    }
    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        self.device.activate(activation)
    }
    fn serve(&self, queue: u16, stop: &QueueStop) {
        self.hook.serve(&self.device, queue, stop)
    }
    fn queue_stopped(&self, queue: u16) {
        self.hook.queue_stopped(&self.device, queue)
    }
    fn queue_started(&self, queue: u16) {
        self.hook.queue_started(&self.device, queue)
    }
    fn reset(&self) {
        self.device.reset()
    }
}

/// A [`ServeHook`] that counts the queue calls its device gets and forwards
/// them.
#[derive(Debug, Default)]
pub struct CountCalls {
    serves: AtomicUsize,
    stopped: AtomicUsize,
    started: AtomicUsize,
}

impl CountCalls {
    /// [`VirtioDevice::serve`] calls so far.
    pub fn serves(&self) -> usize {
        // Relaxed: a statistic; a test reads it after the calls it counts
        // returned (or were joined), which orders them.
        self.serves.load(Ordering::Relaxed)
    }

    /// [`VirtioDevice::queue_stopped`] calls so far.
    pub fn stopped(&self) -> usize {
        // Relaxed: as in `serves`.
        self.stopped.load(Ordering::Relaxed)
    }

    /// [`VirtioDevice::queue_started`] calls so far.
    pub fn started(&self) -> usize {
        // Relaxed: as in `serves`.
        self.started.load(Ordering::Relaxed)
    }
}

impl ServeHook for CountCalls {
    fn serve<D: VirtioDevice + ?Sized>(&self, device: &D, queue: u16, stop: &QueueStop) {
        // Relaxed: counted, not synchronized with (see `serves`).
        self.serves.fetch_add(1, Ordering::Relaxed);
        device.serve(queue, stop)
    }
    fn queue_stopped<D: VirtioDevice + ?Sized>(&self, device: &D, queue: u16) {
        // Relaxed: as in `serve`.
        self.stopped.fetch_add(1, Ordering::Relaxed);
        device.queue_stopped(queue)
    }
    fn queue_started<D: VirtioDevice + ?Sized>(&self, device: &D, queue: u16) {
        // Relaxed: as in `serve`.
        self.started.fetch_add(1, Ordering::Relaxed);
        device.queue_started(queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::EchoDevice;

    /// A hook that keeps the defaults.
    struct Forward;
    impl ServeHook for Forward {}

    #[test]
    fn forwards_the_device_description() {
        let inner = EchoDevice::new(3);
        let dev = Intercept { device: EchoDevice::new(3), hook: Forward };
        assert_eq!(dev.device_type(), inner.device_type());
        assert_eq!(dev.vendor_id(), inner.vendor_id());
        assert_eq!(dev.features(), inner.features());
        assert_eq!(dev.num_queues(), 3);
        assert_eq!(dev.max_queue_size(0), inner.max_queue_size(0));
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        dev.read_config(0, &mut a);
        inner.read_config(0, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn the_hook_sees_each_queue_call_once() {
        let dev = Intercept { device: EchoDevice::new(1), hook: CountCalls::default() };
        dev.queue_stopped(0);
        dev.queue_started(0);
        dev.queue_stopped(0);
        dev.serve(0, &QueueStop::new());
        assert_eq!(dev.hook.serves(), 1);
        assert_eq!(dev.hook.stopped(), 2);
        assert_eq!(dev.hook.started(), 1);
    }
}

//! A mutex that works with and without `std`.
//!
//! With `std` it is `std::sync::Mutex` with poisoning ignored (a device that
//! panicked on another thread must not take the bus down with it); without,
//! a test-and-test-and-set spin lock.

#[cfg(feature = "std")]
mod imp {
    /// Mutual exclusion for device state; see the [module docs](super).
    #[derive(Debug, Default)]
    pub struct Mutex<T>(std::sync::Mutex<T>);

    /// The guard returned by [`Mutex::lock`].
    pub type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        /// A new unlocked mutex holding `value`.
        pub const fn new(value: T) -> Self {
            Mutex(std::sync::Mutex::new(value))
        }

        /// Locks, blocking the thread while another holds the lock.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}

#[cfg(not(feature = "std"))]
mod imp {
    use core::cell::UnsafeCell;
    use core::ops::{Deref, DerefMut};
    use core::sync::atomic::{AtomicBool, Ordering};

    /// Mutual exclusion for device state; see the [module docs](super).
    #[derive(Debug, Default)]
    pub struct Mutex<T> {
        locked: AtomicBool,
        value: UnsafeCell<T>,
    }

    // SAFETY: the lock hands out `&mut T` to one thread at a time, so sharing
    // the mutex is as safe as sending `T`.
    unsafe impl<T: Send> Sync for Mutex<T> {}
    // SAFETY: moving the mutex moves the `T` it owns.
    unsafe impl<T: Send> Send for Mutex<T> {}

    /// The guard returned by [`Mutex::lock`]; unlocks on drop.
    pub struct MutexGuard<'a, T>(&'a Mutex<T>);

    impl<T> Mutex<T> {
        /// A new unlocked mutex holding `value`.
        pub const fn new(value: T) -> Self {
            Mutex { locked: AtomicBool::new(false), value: UnsafeCell::new(value) }
        }

        /// Locks, spinning while another holder has it.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            loop {
                if let Some(g) = self.try_lock() {
                    return g;
                }
                // Spin on a plain load so waiters do not bounce the line.
                while self.locked.load(Ordering::Relaxed) {
                    core::hint::spin_loop();
                }
            }
        }

        /// Locks if free.
        fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            // Acquire pairs with the Release in `MutexGuard::drop`: the
            // previous holder's writes to `value` are visible to us.
            self.locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .ok()
                .map(|_| MutexGuard(self))
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: the guard exists only while `locked` is held by us.
            unsafe { &*self.0.value.get() }
        }
    }
    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: the guard exists only while `locked` is held by us, and
            // `&mut self` makes this the only borrow through it.
            unsafe { &mut *self.0.value.get() }
        }
    }
    impl<T> Drop for MutexGuard<'_, T> {
        fn drop(&mut self) {
            // Release publishes our writes to `value` to the next locker.
            self.0.locked.store(false, Ordering::Release);
        }
    }
}

pub use imp::Mutex;

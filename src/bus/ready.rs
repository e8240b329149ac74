//! The list of retirements whose grace period is over: a lock-free stack that
//! is pushed one node at a time and only ever emptied whole.
//!
//! It is pushed from crossbeam's deferred closures, which may run on a vCPU
//! thread inside its pin, so a push must neither lock nor allocate: the node is
//! allocated by the writer that retired the item, and a push is one
//! compare-and-swap loop. No reviewed primitive fits that: crossbeam's
//! `SegQueue` allocates segments as it grows, `ArrayQueue` is bounded (a vCPU
//! stuck in a device lets retirements pile up without limit), and a lock would
//! let a vCPU wait on a writer. Since nodes are never popped one by one, only
//! taken all at once by a swap, a node cannot be freed and reused while a push
//! still compares against it: the stack has no ABA problem.
//!
//! Its atomics and cells are loom's under `cfg(loom)`, and its orderings are a
//! type parameter, so the loom model at the bottom of this file checks both the
//! stack as built and versions with a weakened ordering, which loom must catch.

use alloc::boxed::Box;
use core::marker::PhantomData;
use core::ptr;
use core::sync::atomic::Ordering;

use prims::{AtomicPtr, UnsafeCell};

/// The atomic and cell types: core's, or loom's when modelling.
#[cfg(not(loom))]
mod prims {
    pub(super) use core::sync::atomic::AtomicPtr;

    /// `core::cell::UnsafeCell` with loom's closure-based access, so the same
    /// code compiles against both.
    pub(super) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(super) const fn new(value: T) -> Self {
            UnsafeCell(core::cell::UnsafeCell::new(value))
        }

        pub(super) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        pub(super) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(loom)]
mod prims {
    pub(super) use loom::cell::UnsafeCell;
    pub(super) use loom::sync::atomic::AtomicPtr;
}

/// The orderings of a push's publishing exchange and of the swap that takes
/// the stack.
pub(super) trait Orderings {
    /// Success ordering of the exchange that publishes a pushed node.
    const PUSH: Ordering;
    /// Ordering of the swap that takes every node.
    const TAKE: Ordering;
}

/// The orderings the stack needs: a push releases its node (its payload and
/// its link) and taking acquires every node pushed before.
pub(super) enum Strong {}

impl Orderings for Strong {
    // Release: whoever takes the stack (Acquire below) sees the node, its
    // payload and its link fully written. Later pushes' exchanges are
    // read-modify-writes, so they continue this release sequence and a take
    // that reads a later head still synchronizes with this push.
    const PUSH: Ordering = Ordering::Release;
    // Acquire pairs with every push's Release.
    const TAKE: Ordering = Ordering::Acquire;
}

/// One pushed item and the link to the node pushed before it.
pub(super) struct Node<T> {
    value: T,
    next: UnsafeCell<*mut Node<T>>,
}

// SAFETY: `next` only links nodes that belong to the same owner (the pusher
// until the push, the stack, then the taking thread), so a node moves between
// threads as a unit, as its value may.
unsafe impl<T: Send> Send for Node<T> {}

impl<T> Node<T> {
    /// Allocates a node for `value`, ahead of the push (which must not
    /// allocate).
    pub(super) fn new(value: T) -> Box<Self> {
        Box::new(Node { value, next: UnsafeCell::new(ptr::null_mut()) })
    }

    pub(super) fn value(&self) -> &T {
        &self.value
    }
}

/// A lock-free stack that is pushed one node at a time and emptied whole.
pub(super) struct Stack<T, O: Orderings = Strong> {
    head: AtomicPtr<Node<T>>,
    /// The stack owns its nodes' values (for the drop check).
    _owns: PhantomData<T>,
    _orderings: PhantomData<fn() -> O>,
}

// SAFETY: the stack hands each value to exactly one thread (the one whose
// swap took it, or the dropping one), so sending or sharing the stack only
// ever moves values between threads, which `T: Send` allows.
unsafe impl<T: Send, O: Orderings> Send for Stack<T, O> {}
// SAFETY: as above; `&Stack` gives no access to a value in place.
unsafe impl<T: Send, O: Orderings> Sync for Stack<T, O> {}

impl<T, O: Orderings> Stack<T, O> {
    pub(super) fn new() -> Self {
        Stack { head: AtomicPtr::new(ptr::null_mut()), _owns: PhantomData, _orderings: PhantomData }
    }

    /// Pushes `node`: lock-free, and neither allocates nor frees.
    pub(super) fn push(&self, node: Box<Node<T>>) {
        let node = Box::into_raw(node);
        // Relaxed: the value is only a guess for the first exchange, and the
        // node is not dereferenced.
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours (from `Box::into_raw` above) until the
            // exchange below publishes it.
            unsafe { &*node }.next.with_mut(|next| {
                // SAFETY: nobody else can reach the node yet (see above).
                unsafe { *next = head }
            });
            // `O::PUSH` (Release, see `Strong`) publishes the node. Relaxed on
            // failure: we retry with the fresh head and have published
            // nothing.
            match self.head.compare_exchange_weak(head, node, O::PUSH, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Takes every node pushed so far, newest first. Dropping the chain drops
    /// the values left in it.
    pub(super) fn take(&self) -> Chain<T> {
        // `O::TAKE` (Acquire, see `Strong`) pairs with every push's Release.
        Chain(self.head.swap(ptr::null_mut(), O::TAKE))
    }
}

impl<T, O: Orderings> Drop for Stack<T, O> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// Nodes taken off a [`Stack`], owned by the thread whose swap took them.
pub(super) struct Chain<T>(*mut Node<T>);

impl<T> Iterator for Chain<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        // Step past the node before anything can unwind (under loom, reading
        // the link can), so no node is ever taken twice.
        let node = core::mem::replace(&mut self.0, ptr::null_mut());
        if node.is_null() {
            return None;
        }
        // SAFETY: every node in the chain came from `Box::into_raw` in
        // `Stack::push`, and the chain was taken off the stack by one swap, so
        // this thread owns each node, and the line above steps past it.
        let node = unsafe { Box::from_raw(node) };
        // SAFETY: the link was written before the push that published the
        // node, and the take's swap acquired that push.
        self.0 = node.next.with(|next| unsafe { *next });
        Some(node.value)
    }
}

impl<T> Drop for Chain<T> {
    fn drop(&mut self) {
        /// Finishes the chain if dropping one value unwinds (possible without
        /// `std`, where a device destructor's panic propagates), so the rest
        /// are still dropped before the panic goes on.
        struct Rest<'a, T>(&'a mut Chain<T>);

        impl<T> Drop for Rest<'_, T> {
            fn drop(&mut self) {
                self.0.by_ref().for_each(drop);
            }
        }

        let rest = Rest(self);
        rest.0.by_ref().for_each(drop);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use alloc::vec::Vec;

    use super::{Node, Stack};

    #[test]
    fn takes_everything_pushed_newest_first_and_only_once() {
        let stack: Stack<u32> = Stack::new();
        for i in 0..3 {
            stack.push(Node::new(i));
        }
        assert_eq!(stack.take().collect::<Vec<_>>(), [2, 1, 0]);
        assert_eq!(stack.take().count(), 0);
        stack.push(Node::new(7));
        assert_eq!(stack.take().collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn dropping_the_stack_or_a_chain_drops_what_is_left() {
        use alloc::sync::Arc;
        let token = Arc::new(());
        let stack: Stack<Arc<()>> = Stack::new();
        for _ in 0..3 {
            stack.push(Node::new(Arc::clone(&token)));
        }
        let mut chain = stack.take();
        drop(chain.next());
        drop(chain);
        assert_eq!(Arc::strong_count(&token), 1);
        stack.push(Node::new(Arc::clone(&token)));
        drop(stack);
        assert_eq!(Arc::strong_count(&token), 1);
    }

    #[test]
    fn a_panicking_value_does_not_stop_the_rest_of_the_chain() {
        use alloc::sync::Arc;
        struct Bomb(#[expect(dead_code, reason = "held for its drop")] Arc<()>);
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("bomb");
            }
        }
        let token = Arc::new(());
        let stack: Stack<(Arc<()>, Option<Bomb>)> = Stack::new();
        stack.push(Node::new((Arc::clone(&token), None)));
        stack.push(Node::new((Arc::clone(&token), Some(Bomb(Arc::clone(&token))))));
        stack.push(Node::new((Arc::clone(&token), None)));
        let chain = stack.take();
        let unwound = std::panic::catch_unwind(core::panic::AssertUnwindSafe(move || drop(chain)));
        assert!(unwound.is_err());
        assert_eq!(Arc::strong_count(&token), 1, "every value was dropped");
    }
}

/// The loom model: `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_model {
    use alloc::boxed::Box;
    use alloc::sync::Arc as StdArc;
    use alloc::vec::Vec;
    use core::sync::atomic::{AtomicUsize, Ordering};

    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;

    use super::{Node, Orderings, Stack, Strong};

    /// Which items were taken: a plain atomic, not loom's, so the bookkeeping
    /// adds neither interleavings nor synchronization to the model.
    type Taken = StdArc<AtomicUsize>;

    /// A pushed item: its payload is a loom cell written by the pusher, so
    /// loom reports a read that does not happen after the write. Dropping it
    /// checks the payload and records it as taken, exactly once.
    struct Item {
        id: usize,
        payload: UnsafeCell<usize>,
        taken: Taken,
    }

    impl Item {
        fn new(id: usize, taken: &Taken) -> Box<Node<Item>> {
            let item = Item { id, payload: UnsafeCell::new(0), taken: StdArc::clone(taken) };
            item.payload.with_mut(|p| {
                // SAFETY: the item is not shared yet.
                unsafe { *p = 100 + id }
            });
            Node::new(item)
        }
    }

    impl Drop for Item {
        fn drop(&mut self) {
            // Once a check failed, the chain still drops the other items:
            // a second panic would abort the test instead of failing it.
            if std::thread::panicking() {
                return;
            }
            // SAFETY: the dropping thread owns the item; loom checks that the
            // pusher's write happens before this read.
            let payload = self.payload.with(|p| unsafe { *p });
            assert_eq!(payload, 100 + self.id, "payload fully visible");
            // Relaxed: loom runs its threads one at a time, and a
            // read-modify-write sees every earlier one anyway.
            let before = self.taken.fetch_or(1 << self.id, Ordering::Relaxed);
            assert_eq!(before & (1 << self.id), 0, "item {} taken twice", self.id);
        }
    }

    /// Two pushers, two items each, race a take; what is left is taken after
    /// joining them.
    fn pushers_race_a_take<O: Orderings + 'static>() {
        loom::model(|| {
            let stack = Arc::new(Stack::<Item, O>::new());
            let taken = Taken::default();
            let pushers: Vec<_> = (0..2)
                .map(|id| {
                    let (stack, taken) = (Arc::clone(&stack), StdArc::clone(&taken));
                    thread::spawn(move || {
                        stack.push(Item::new(2 * id, &taken));
                        stack.push(Item::new(2 * id + 1, &taken));
                    })
                })
                .collect();
            stack.take().for_each(drop);
            for thread in pushers {
                thread.join().expect("pusher");
            }
            stack.take().for_each(drop);
            assert_eq!(taken.load(Ordering::Relaxed), 0b1111, "every item taken");
        });
    }

    #[test]
    fn loom_pushers_race_a_take() {
        pushers_race_a_take::<Strong>();
    }

    /// The stack's last owner drops it while another thread may still be
    /// taking: each item goes to exactly one of them.
    #[test]
    fn loom_drop_races_a_take() {
        loom::model(|| {
            let stack = Arc::new(Stack::<Item>::new());
            let taken = Taken::default();
            let pusher = {
                let (stack, taken) = (Arc::clone(&stack), StdArc::clone(&taken));
                thread::spawn(move || {
                    stack.push(Item::new(0, &taken));
                    stack.push(Item::new(1, &taken));
                })
            };
            let taker = thread::spawn(move || stack.take().for_each(drop));
            pusher.join().expect("pusher");
            taker.join().expect("taker");
            assert_eq!(taken.load(Ordering::Relaxed), 0b11, "every item taken");
        });
    }

    /// A push that publishes with Relaxed.
    enum RelaxedPush {}
    impl Orderings for RelaxedPush {
        const PUSH: Ordering = Ordering::Relaxed;
        const TAKE: Ordering = Ordering::Acquire;
    }

    /// A take that swaps with Relaxed.
    enum RelaxedTake {}
    impl Orderings for RelaxedTake {
        const PUSH: Ordering = Ordering::Release;
        const TAKE: Ordering = Ordering::Relaxed;
    }

    // The model must catch each weakened ordering: a taker that reads a
    // node's link or payload without synchronizing with its push.

    #[test]
    #[should_panic(expected = "Causality violation")]
    fn loom_catches_a_relaxed_push() {
        pushers_race_a_take::<RelaxedPush>();
    }

    #[test]
    #[should_panic(expected = "Causality violation")]
    fn loom_catches_a_relaxed_take() {
        pushers_race_a_take::<RelaxedTake>();
    }
}

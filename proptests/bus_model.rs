//! Random register/unregister/remap/transaction/lookup sequences on an
//! `IoBus`, checked against a `BTreeMap` model of who owns what.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use vmio::{
    Access, AccessError, BusError, Device, DeviceError, DeviceId, Edit, IoBus, IoRange, Mmio, Width,
};

/// Reads answer the device's tag, so a hit names who answered.
struct Tag(u64);

impl Device for Tag {
    fn read(&self, _: Access) -> Result<u64, DeviceError> {
        Ok(self.0)
    }
    fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        start: u64,
        len: u64,
    },
    /// Picks a live device by index modulo the live count (or an unknown id).
    Unregister {
        pick: usize,
    },
    Remap {
        pick: usize,
        start: u64,
        len: u64,
    },
    Transaction(Vec<Op>),
    Read {
        addr: u64,
        width: Width,
    },
}

/// Addresses cluster in a small window (so ranges collide often) plus a
/// window at the very top of the space.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..0x400, 1 => (u64::MAX - 0x100)..=u64::MAX]
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 1u64..0x40, 1 => 0u64..0x200, 1 => Just(u64::MAX)]
}

fn width() -> impl Strategy<Value = Width> {
    prop::sample::select(vec![Width::U8, Width::U16, Width::U32, Width::U64])
}

fn edit() -> impl Strategy<Value = Op> {
    prop_oneof![
        (addr(), len()).prop_map(|(start, len)| Op::Register { start, len }),
        any::<usize>().prop_map(|pick| Op::Unregister { pick }),
        (any::<usize>(), addr(), len()).prop_map(|(pick, start, len)| Op::Remap {
            pick,
            start,
            len
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => edit(),
        1 => prop::collection::vec(edit(), 0..6).prop_map(Op::Transaction),
        4 => (addr(), width()).prop_map(|(addr, width)| Op::Read { addr, width }),
    ]
}

/// The model: start -> (last, bus id, tag).
#[derive(Clone, Default)]
struct Model {
    ranges: BTreeMap<u64, (u64, DeviceId, u64)>,
}

impl Model {
    fn live(&self) -> Vec<DeviceId> {
        let mut ids: Vec<_> = self.ranges.values().map(|v| v.1).collect();
        ids.sort();
        ids
    }

    fn pick(&self, pick: usize) -> DeviceId {
        let live = self.live();
        // One pick in eight names a device that does not exist.
        if live.is_empty() || pick % 8 == 7 {
            return unknown_id();
        }
        live[pick % live.len()]
    }

    fn remove(&mut self, id: DeviceId) -> Result<(u64, u64, u64), BusError> {
        let start =
            *self.ranges.iter().find(|(_, v)| v.1 == id).ok_or(BusError::UnknownDevice(id))?.0;
        let (last, _, tag) = self.ranges.remove(&start).unwrap();
        Ok((start, last, tag))
    }

    fn insert(&mut self, r: IoRange<Mmio>, id: DeviceId, tag: u64) -> Result<(), BusError> {
        let (start, last) = (r.start(), r.last());
        let overlap = |s: u64, v: &(u64, DeviceId, u64)| BusError::Overlap {
            start,
            last,
            existing: v.1,
            existing_start: s,
            existing_last: v.0,
        };
        if let Some((&s, v)) = self.ranges.range(..start).next_back()
            && v.0 >= start
        {
            return Err(overlap(s, v));
        }
        if let Some((&s, v)) = self.ranges.range(start..).next()
            && s <= last
        {
            return Err(overlap(s, v));
        }
        self.ranges.insert(start, (last, id, tag));
        Ok(())
    }

    fn read(&self, addr: u64, width: Width) -> Result<u64, AccessError> {
        let (&start, &(last, id, tag)) =
            self.ranges.range(..=addr).next_back().ok_or(AccessError::Unmapped { addr })?;
        debug_assert!(start <= addr);
        if addr > last {
            return Err(AccessError::Unmapped { addr });
        }
        match addr.checked_add(width.bytes() - 1) {
            Some(end) if end <= last => Ok(tag),
            _ => Err(AccessError::Straddles { addr, width: width.bytes(), device: id }),
        }
    }
}

/// An id no bus in these tests hands out (ids count up from 1).
fn unknown_id() -> DeviceId {
    DeviceId::from_raw(u64::MAX)
}

struct Harness {
    bus: IoBus<Mmio>,
    model: Model,
    next_tag: u64,
}

impl Harness {
    /// Turns a generated edit into a bus edit plus the model's view of it.
    fn edit(&mut self, op: &Op, pending: &mut Vec<u64>) -> Option<Edit<Mmio>> {
        match *op {
            Op::Register { start, len } => {
                let range = IoRange::new(start, len).ok()?;
                self.next_tag += 1;
                pending.push(self.next_tag);
                Some(Edit::Register { range, device: Arc::new(Tag(self.next_tag)) })
            }
            Op::Unregister { pick } => Some(Edit::Unregister(self.model.pick(pick))),
            Op::Remap { pick, start, len } => {
                let range = IoRange::new(start, len).ok()?;
                Some(Edit::Remap { id: self.model.pick(pick), range })
            }
            _ => None,
        }
    }

    fn apply(&mut self, ops: &[Op]) -> Result<(), TestCaseError> {
        // Build the bus edits and run them on a scratch copy of the model.
        let mut edits = Vec::new();
        let mut tags = Vec::new();
        for op in ops {
            if let Some(e) = self.edit(op, &mut tags) {
                edits.push(e);
            }
        }
        let plan: Vec<_> = edits
            .iter()
            .map(|e| match e {
                Edit::Register { range, .. } => (0, *range, None),
                Edit::Unregister(id) => (1, IoRange::new(0, 1).unwrap(), Some(*id)),
                Edit::Remap { id, range } => (2, *range, Some(*id)),
            })
            .collect();
        let generation = self.bus.generation();
        let result = self.bus.transaction(edits);
        // Replay on the model with the ids the bus reported (ids are only
        // known after commit; on failure the model must refuse too).
        let mut model = self.model.clone();
        let mut model_err = None;
        let mut reg = 0;
        for (kind, range, id) in plan {
            let step = match kind {
                0 => {
                    let id = match &result {
                        Ok(c) => c.registered[reg],
                        // A failed transaction's ids are never reported;
                        // overlaps are compared by range below.
                        Err(_) => DeviceId::from_raw(u64::MAX - 1 - reg as u64),
                    };
                    let tag = tags[reg];
                    reg += 1;
                    model.insert(range, id, tag)
                }
                1 => model.remove(id.unwrap()).map(drop),
                _ => model
                    .remove(id.unwrap())
                    .and_then(|(_, _, tag)| model.insert(range, id.unwrap(), tag)),
            };
            if let Err(e) = step {
                model_err = Some(e);
                break;
            }
        }
        match (&result, model_err) {
            (Ok(_), None) => {
                prop_assert_eq!(self.bus.generation(), generation + 1);
                self.model = model;
            }
            (Err(got), Some(want)) => {
                // An overlap with a device registered earlier in the same
                // failed transaction names an id the test cannot know.
                match (got, &want) {
                    (
                        BusError::Overlap {
                            start: a,
                            last: b,
                            existing_start: c,
                            existing_last: d,
                            ..
                        },
                        BusError::Overlap {
                            start: e,
                            last: f,
                            existing_start: g,
                            existing_last: h,
                            ..
                        },
                    ) => prop_assert_eq!((a, b, c, d), (e, f, g, h)),
                    _ => prop_assert_eq!(*got, want),
                }
                prop_assert_eq!(
                    self.bus.generation(),
                    generation,
                    "a refused edit publishes nothing"
                );
            }
            (got, want) => prop_assert!(
                false,
                "bus said {:?}, model said {:?}",
                got.as_ref().map(|_| ()),
                want
            ),
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn bus_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut h = Harness { bus: IoBus::new(), model: Model::default(), next_tag: 0 };
        let mut vcpu = h.bus.handle(0);
        for op in &ops {
            match op {
                Op::Read { addr, width } => {
                    let want = h.model.read(*addr, *width);
                    prop_assert_eq!(vcpu.read(*addr, *width), want);
                    prop_assert_eq!(h.bus.read(*addr, *width), want);
                }
                Op::Transaction(ops) => h.apply(ops)?,
                single => h.apply(std::slice::from_ref(single))?,
            }
            // The published table is exactly the model.
            let want: Vec<_> = h.model.ranges.iter().map(|(&s, &(l, id, _))| (id, s, l)).collect();
            let got: Vec<_> = h.bus.devices().into_iter().map(|(id, r)| (id, r.start(), r.last())).collect();
            prop_assert_eq!(got, want);
        }
    }
}

//! Random register/unregister/remap/transaction/lookup sequences on an
//! `IoBus`, checked against a `BTreeMap` model of who owns what.

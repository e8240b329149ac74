//! Documentation-only modules: nothing here is code you call.

pub mod performance;

//! The whole-system check: `scripts/linux-guest` builds a small Linux
//! kernel, boots it under KVM with the `kvm_vmm` example (every device of
//! the VM is vmio's), and checks from both sides that Linux's virtio-blk
//! driver found the disk, mounted its ext4 file system read-write through
//! vmio and left it consistent.
//!
//! Minutes long, and it needs `/dev/kvm`, apt and network access the first
//! time (kernel sources and build tools), so it is ignored by default:
//!
//! ```sh
//! cargo test --test linux_guest -- --ignored --nocapture
//! ```
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::process::Command;

#[test]
#[ignore = "boots Linux under KVM: minutes long, needs /dev/kvm and apt; run with --ignored"]
fn linux_boots_on_vmio_devices() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/linux-guest");
    let status = Command::new("bash").arg(script).status().expect("run scripts/linux-guest");
    match status.code() {
        Some(0) => {}
        Some(77) => eprintln!("skipped: this host has no usable KVM device"),
        other => {
            panic!("scripts/linux-guest failed with status {other:?} (its verdict line says why)")
        }
    }
}

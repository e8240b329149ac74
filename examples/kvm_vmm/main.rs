//! A small KVM hypervisor whose whole device layer is vmio: it boots an
//! unmodified Linux kernel (an ELF `vmlinux`, through the PVH entry) whose
//! own 8250, virtio-mmio and virtio-blk drivers are vmio's clients.
//!
//! ```sh
//! cargo run --release --features kvm --example kvm_vmm -- \
//!     --kernel vmlinux --disk disk0=rootfs.ext4 [--vcpus N] [--mem MiB]
//! ```
//!
//! - Devices come from `examples/kvm_vmm/vm.toml`, built by a
//!   `DeviceManager`: the 16550 console, virtio-blk disks (announced on
//!   the command line as `virtio_mmio.device=<len>@<base>:<irq>`), the
//!   i8042 reset port (a kind this VMM registers) and reserved holes.
//! - KVM's in-kernel IOAPIC/PIC and PIT; every device interrupt is an
//!   irqfd; every virtio queue notify an ioeventfd served by vmio's
//!   queue workers, off the vCPU threads.
//! - One thread per vCPU, each dispatching its MMIO and port exits through
//!   its own `VcpuIo`; an MP table describes the vCPUs and the IOAPIC.
//! - A host thread hot-plugs and removes scratch devices (and a disk the
//!   guest never sees) while the guest runs.
//!
//! On exit it prints the boot milestones seen on the console, exits by
//! kind, time in vmio's dispatch against vCPU time, requests served per
//! disk and the hot-plug edits made. The exit status is 0 when the guest
//! reset the machine (through the i8042 port), 77 without a usable
//! `/dev/kvm`, 1 otherwise.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod boot;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod console;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod devices;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod hotplug;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod irq;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod memory;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod mptable;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod notify;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod vcpu;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod vmm;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn main() -> std::process::ExitCode {
    vmm::main()
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn main() -> std::process::ExitCode {
    eprintln!("kvm_vmm: KVM on x86_64 Linux only");
    std::process::ExitCode::from(77)
}

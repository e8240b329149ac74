//! Booting Linux through the PVH entry: load the ELF `vmlinux`, write the
//! `hvm_start_info` with its memory map and command line, and put the boot
//! vCPU in 32-bit protected mode at the entry point (paging off, flat
//! segments, `ebx` = start info), as the PVH boot ABI asks.

use std::fs::File;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::Ram;

/// Where the boot structures go in low memory.
const GDT_ADDR: u64 = 0x500;
const START_INFO_ADDR: u64 = 0x6000;
const MODLIST_ADDR: u64 = 0x6800;
const MEMMAP_ADDR: u64 = 0x7000;
const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room for the command line: up to the next page table area.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// The MP table sits in the traditional EBDA, which the memory map keeps
/// out of usable RAM.
pub const EBDA_START: u64 = 0x9_fc00;
/// The kernel is loaded at or above 1 MiB.
const HIMEM_START: u64 = 0x10_0000;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What the boot vCPU needs to start the kernel.
pub struct Entry {
    /// The kernel's PVH entry point (32-bit, paging off).
    pub pvh_entry: u64,
    /// Last byte of the loaded kernel.
    pub kernel_end: u64,
}

/// Loads the ELF kernel at `path` into `ram`; fails unless it has a PVH
/// entry note (CONFIG_PVH).
pub fn load_kernel(ram: &Ram, path: &str) -> Result<Entry, String> {
    let mut file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let loaded = Elf::load(&*ram.0, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| format!("{path}: not a loadable ELF kernel: {e}"))?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            Ok(Entry { pvh_entry: entry.0, kernel_end: loaded.kernel_end })
        }
        _ => Err(format!("{path}: the kernel has no PVH entry point (build it with CONFIG_PVH)")),
    }
}

/// Loads an initramfs at the top of RAM (below `limit`), page-aligned;
/// returns its address and size.
pub fn load_initrd(ram: &Ram, path: &str, kernel_end: u64) -> Result<(u64, u64), String> {
    let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let size = data.len() as u64;
    let addr = ram.size().checked_sub(size).map(|a| a & !0xfff).filter(|&a| a > kernel_end);
    let addr = addr.ok_or_else(|| format!("{path}: {size} bytes do not fit in guest RAM"))?;
    ram.0.write_slice(&data, GuestAddress(addr)).map_err(|e| format!("initrd: {e}"))?;
    Ok((addr, size))
}

/// Writes the command line, the memory map and the start info.
pub fn write_boot_params(
    ram: &Ram,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
) -> Result<(), String> {
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| format!("command line: {e}"))?;
    cl.insert_str(cmdline).map_err(|e| format!("command line: {e}"))?;
    load_cmdline(&*ram.0, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| format!("command line: {e}"))?;

    // Usable RAM below the EBDA and from 1 MiB up; the EBDA (MP table) and
    // the legacy VGA/BIOS area in between are reserved.
    let memmap = [
        hvm_memmap_table_entry { addr: 0, size: EBDA_START, type_: E820_RAM, reserved: 0 },
        hvm_memmap_table_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            type_: E820_RESERVED,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: HIMEM_START,
            size: ram.size() - HIMEM_START,
            type_: E820_RAM,
            reserved: 0,
        },
    ];
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if let Some((paddr, size)) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = MODLIST_ADDR;
        params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
        params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
        let module = hvm_modlist_entry { paddr, size, ..Default::default() };
        params.set_modules(&[module], GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap>(&params, &*ram.0)
        .map_err(|e| format!("PVH boot parameters: {e}"))
}

/// A flat GDT entry: `flags` holds the access byte (bits 0–7) and the
/// granularity/size nibble (bits 12–15).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment register a GDT entry at `index` loads.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let bits = |shift: u32, width: u32| ((entry >> shift) & ((1 << width) - 1)) as u8;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bits(55, 1);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: bits(40, 4),
        present: bits(47, 1),
        dpl: bits(45, 2),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g,
        avl: bits(52, 1),
        unusable: u8::from(bits(47, 1) == 0),
        padding: 0,
    }
}

/// Puts the boot vCPU at the PVH entry: 32-bit protected mode, flat code
/// and data segments, paging off, `rbx` = the start info's address.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, ram: &Ram, entry: &Entry) -> Result<(), String> {
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xffff_ffff), // code: 32-bit, execute/read
        gdt_entry(0xc093, 0, 0xffff_ffff), // data: 32-bit, read/write
        gdt_entry(0x008b, 0, 0x67),        // TSS: 32-bit busy
    ];
    for (i, e) in gdt.iter().enumerate() {
        ram.0
            .write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| format!("GDT: {e}"))?;
    }
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let (code, data, tss) = (segment(gdt[1], 1), segment(gdt[2], 2), segment(gdt[3], 3));
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = 0x1 | 0x10; // PE, ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;

    let regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry.pvh_entry,
        rbx: START_INFO_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
}

/// FPU state at reset: x87 control word and MXCSR defaults.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), String> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))
}

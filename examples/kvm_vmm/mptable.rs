//! An Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI learns its CPUs, its IOAPIC and how ISA interrupts reach it.
//!
//! Linux scans the last KiB of base memory for the floating pointer
//! (`_MP_`), which points at the configuration table (`PCMP`) right behind
//! it: one processor entry per vCPU, one ISA bus, the IOAPIC KVM emulates
//! (KVM_CREATE_IRQCHIP) and one interrupt entry per IOAPIC pin with the
//! bus's default polarity and trigger (edge, active high), plus the two
//! local interrupts (ExtINT on LINT0, NMI on LINT1).
//!
//! ISA IRQ n is on pin n, except IRQ 0: KVM wires GSI 0 (the PIT) to
//! IOAPIC pin 2, as PC chipsets do (ACPI describes it as an interrupt
//! source override), so the table says IRQ 0 → pin 2 and has no IRQ 2.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::Ram;

/// Physical address of the local APICs and of the IOAPIC.
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Pins of KVM's IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
/// The IOAPIC pin KVM's PIT (GSI 0) raises.
const PIT_PIN: u8 = 2;
/// Room the table may take (the reserved EBDA area is larger, but Linux
/// only looks for the floating pointer in its first KiB).
const MAX_LEN: usize = 0x400;

/// The most vCPUs one table describes within [`MAX_LEN`].
pub const MAX_CPUS: usize = 32;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

const IRQ_INT: u8 = 0;
const IRQ_NMI: u8 = 1;
const IRQ_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus" (ISA: edge, active high).
const IRQ_FLAGS_BUS_DEFAULT: u16 = 0;

const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 in the processor signature; FPU and APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// The IOAPIC's id in the table: after the processors' APIC ids.
pub fn ioapic_id(cpus: usize) -> u8 {
    // `cpus <= MAX_CPUS` is checked by `build`.
    cpus as u8
}

/// The floating pointer followed by the configuration table, for a table
/// placed at guest address `at`.
pub fn build(at: u64, cpus: usize) -> Result<Vec<u8>, String> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(format!("the MP table describes 1 to {MAX_CPUS} vCPUs, not {cpus}"));
    }
    let ioapic = ioapic_id(cpus);
    let table_at = u32::try_from(at + 16).map_err(|_| "MP table above 4 GiB".to_string())?;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in (0..IOAPIC_PINS).filter(|&irq| irq != PIT_PIN) {
        let pin = if irq == 0 { PIT_PIN } else { irq };
        entries.extend_from_slice(&[ENTRY_INTSRC, IRQ_INT]);
        entries.extend_from_slice(&IRQ_FLAGS_BUS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, irq, ioapic, pin]);
        count += 1;
    }
    for (kind, dest, lint) in [(IRQ_EXTINT, 0, 0), (IRQ_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[ENTRY_LINTSRC, kind]);
        entries.extend_from_slice(&IRQ_FLAGS_BUS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, 0, dest, lint]);
        count += 1;
    }

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let length = u16::try_from(44 + entries.len()).expect("at most a few KiB");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum (below)
    table.extend_from_slice(b"VMIO    ");
    table.extend_from_slice(b"KVM_VMM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_at.to_le_bytes());
    // Length in 16-byte units, spec 1.4, checksum (below), feature bytes:
    // 0 = a configuration table is present, no default configuration.
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    if out.len() > MAX_LEN {
        return Err(format!("the MP table takes {} bytes, more than {MAX_LEN}", out.len()));
    }
    Ok(out)
}

/// Builds the table for `cpus` vCPUs and writes it at `at`.
pub fn write(ram: &Ram, at: u64, cpus: usize) -> Result<(), String> {
    let table = build(at, cpus)?;
    ram.0.write_slice(&table, GuestAddress(at)).map_err(|e| format!("MP table: {e}"))
}

//! A 16550A UART: enough of the register file for a Linux `ttyS` console
//! (the 8250 driver's probe, polled and interrupt-driven transmit, receive).
//!
//! Transmit is instantaneous: every byte the guest writes to THR goes
//! straight to the output, so the line status always reports an empty
//! transmitter. Received bytes come from [`Uart16550::push_input`].

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;

use crate::device::{Access, Device, DeviceError};
use crate::irq::IrqLine;
use crate::sync::Mutex;

/// Register offsets (in register units, before any `reg_shift`).
const RBR_THR_DLL: u64 = 0;
const IER_DLM: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;

const IIR_NONE: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// Receive buffer depth. A real 16550 has 16 bytes of FIFO; a larger buffer
/// lets a VMM paste a line without pacing it, and still bounds memory.
pub const RX_CAPACITY: usize = 1024;

/// Where transmitted bytes go.
pub type UartOutput = Box<dyn FnMut(&[u8]) + Send>;

struct Regs {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo: bool,
    /// THR-empty interrupt latched: set when THR empties (or THRI gets
    /// enabled while it is empty), cleared by an IIR read that reports it
    /// or by the next THR write.
    thre_pending: bool,
    overrun: bool,
    rx: VecDeque<u8>,
    /// The level last driven on the interrupt line.
    level: bool,
    output: UartOutput,
    irq: Option<Arc<dyn IrqLine>>,
}

impl Regs {
    fn iir(&self) -> u8 {
        let id = if self.ier & IER_RLSI != 0 && self.overrun {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thre_pending {
            IIR_THRI
        } else {
            IIR_NONE
        };
        if self.fifo { id | IIR_FIFO_ENABLED } else { id }
    }

    fn lsr(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        lsr
    }

    fn msr(&self) -> u8 {
        if self.mcr & MCR_LOOP != 0 {
            // Loopback wires the modem outputs back to the inputs; Linux's
            // 8250 probe checks exactly this mapping.
            let mut msr = 0;
            if self.mcr & MCR_RTS != 0 {
                msr |= MSR_CTS;
            }
            if self.mcr & MCR_DTR != 0 {
                msr |= MSR_DSR;
            }
            if self.mcr & MCR_OUT1 != 0 {
                msr |= MSR_RI;
            }
            if self.mcr & MCR_OUT2 != 0 {
                msr |= MSR_DCD;
            }
            msr
        } else {
            // A console with the far end always present and ready.
            MSR_CTS | MSR_DSR | MSR_DCD
        }
    }

    fn receive(&mut self, byte: u8) -> bool {
        if self.rx.len() >= RX_CAPACITY {
            self.overrun = true;
            return false;
        }
        self.rx.push_back(byte);
        true
    }

    /// Drives the interrupt line to the current IIR state, on changes only.
    /// Called with the register lock held so levels reach the line in the
    /// order the register changes happened.
    fn update_irq(&mut self) {
        let level = self.iir() & IIR_NONE == 0;
        if level != self.level {
            self.level = level;
            if let Some(irq) = &self.irq {
                irq.set_level(level);
            }
        }
    }
}

/// A 16550A UART on port I/O (or MMIO, with `reg_shift` for 32-bit-spaced
/// registers).
///
/// Its registers are 8 bits wide. An access wider than the register
/// spacing (a 2- or 8-byte access to a PC UART) is refused with
/// [`DeviceError::InvalidWidth`] instead of being cut to its low byte; with
/// `reg_shift` 2, 1-, 2- and 4-byte accesses reach the register in the low
/// byte of each 4-byte slot.
///
/// Lock order: the register lock, then the output callback and the
/// interrupt line (both leaves: they must not call back into the UART).
pub struct Uart16550 {
    regs: Mutex<Regs>,
    reg_shift: u32,
}

impl Uart16550 {
    /// A UART whose transmitted bytes go to `output`.
    pub fn new(output: impl FnMut(&[u8]) + Send + 'static) -> Self {
        Self::with_output(Box::new(output))
    }

    /// A UART writing to `writer`, flushed at each newline (a console).
    /// Write errors are dropped: a broken host terminal must not fault the guest.
    #[cfg(feature = "std")]
    pub fn with_writer(mut writer: impl std::io::Write + Send + 'static) -> Self {
        Self::new(move |bytes| {
            let _ = writer.write_all(bytes);
            if bytes.contains(&b'\n') {
                let _ = writer.flush();
            }
        })
    }

    /// A UART with a boxed output.
    pub fn with_output(output: UartOutput) -> Self {
        Uart16550 {
            regs: Mutex::new(Regs {
                ier: 0,
                lcr: 0,
                mcr: 0,
                scr: 0,
                // 115200 baud from the PC's 1.8432 MHz clock.
                dll: 1,
                dlm: 0,
                fifo: false,
                thre_pending: false,
                overrun: false,
                rx: VecDeque::new(),
                level: false,
                output,
                irq: None,
            }),
            reg_shift: 0,
        }
    }

    /// Registers spaced `1 << shift` bytes apart (MMIO UARTs on Arm and
    /// RISC-V boards commonly use 2).
    ///
    /// # Panics
    /// If `shift > 3`: no UART spaces its registers wider than 8 bytes.
    #[must_use]
    pub fn with_reg_shift(mut self, shift: u32) -> Self {
        assert!(shift <= 3, "register shift {shift} is above 3");
        self.reg_shift = shift;
        self
    }

    /// Wires the UART's interrupt output (level-triggered) to `irq`.
    #[must_use]
    pub fn with_interrupt(self, irq: Arc<dyn IrqLine>) -> Self {
        self.regs.lock().irq = Some(irq);
        self
    }

    /// Bytes of register window this UART decodes.
    pub fn window(&self) -> u64 {
        8 << self.reg_shift
    }

    /// Queues `bytes` as received from the far end; returns how many fit
    /// (the rest set the overrun flag, as a real UART would).
    pub fn push_input(&self, bytes: &[u8]) -> usize {
        let mut r = self.regs.lock();
        let taken = bytes.iter().take_while(|&&b| r.receive(b)).count();
        r.update_irq();
        taken
    }

    /// Whether the interrupt line is currently asserted.
    pub fn irq_asserted(&self) -> bool {
        self.regs.lock().level
    }

    /// The register `access` addresses. An access may be as wide as the
    /// register spacing (`1 << reg_shift` bytes): byte accesses only at the
    /// PC's spacing of 1, up to 32-bit accesses for the 32-bit-spaced MMIO
    /// UARTs that drivers reach with `readl`/`writel`. The register is the
    /// low byte; reads return zero above it, writes ignore it. A wider
    /// access is refused rather than cut to its low byte: on a real bus it
    /// would touch the neighbouring registers too.
    fn register(&self, access: Access) -> Result<u64, DeviceError> {
        let offset = access.offset;
        let mask = (1u64 << self.reg_shift) - 1;
        let reg = offset >> self.reg_shift;
        if offset & mask != 0 || reg > SCR {
            return Err(DeviceError::InvalidOffset(offset));
        }
        if access.width.bytes() > 1 << self.reg_shift {
            return Err(DeviceError::InvalidWidth(access.width));
        }
        Ok(reg)
    }
}

impl core::fmt::Debug for Uart16550 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Uart16550").field("reg_shift", &self.reg_shift).finish_non_exhaustive()
    }
}

impl Device for Uart16550 {
    fn read(&self, access: Access) -> Result<u64, DeviceError> {
        let reg = self.register(access)?;
        let mut r = self.regs.lock();
        let dlab = r.lcr & LCR_DLAB != 0;
        let value = match reg {
            RBR_THR_DLL if dlab => r.dll,
            RBR_THR_DLL => r.rx.pop_front().unwrap_or(0),
            IER_DLM if dlab => r.dlm,
            IER_DLM => r.ier,
            IIR_FCR => {
                let iir = r.iir();
                // Reading IIR acknowledges a THR-empty interrupt it reports.
                if iir & 0x0f == IIR_THRI {
                    r.thre_pending = false;
                }
                iir
            }
            LCR => r.lcr,
            MCR => r.mcr,
            LSR => {
                let lsr = r.lsr();
                r.overrun = false;
                lsr
            }
            MSR => r.msr(),
            _ => r.scr,
        };
        r.update_irq();
        Ok(value.into())
    }

    fn write(&self, access: Access, value: u64) -> Result<(), DeviceError> {
        let reg = self.register(access)?;
        // Registers are 8 bits; `register` let through only accesses no
        // wider than the register slot, whose upper bytes decode nothing.
        let byte = value as u8;
        let mut r = self.regs.lock();
        let dlab = r.lcr & LCR_DLAB != 0;
        match reg {
            RBR_THR_DLL if dlab => r.dll = byte,
            RBR_THR_DLL => {
                if r.mcr & MCR_LOOP != 0 {
                    r.receive(byte);
                } else {
                    (r.output)(&[byte]);
                }
                // The byte left at once: THR is empty again.
                r.thre_pending = true;
            }
            IER_DLM if dlab => r.dlm = byte,
            IER_DLM => {
                let enabling_thri = byte & IER_THRI != 0 && r.ier & IER_THRI == 0;
                r.ier = byte & 0x0f;
                // A 16550 raises THRE as soon as the interrupt is enabled
                // with THR empty; Linux's interrupt-driven transmit relies on it.
                if enabling_thri {
                    r.thre_pending = true;
                }
            }
            IIR_FCR => {
                r.fifo = byte & FCR_ENABLE != 0;
                if byte & FCR_CLEAR_RX != 0 {
                    r.rx.clear();
                }
            }
            LCR => r.lcr = byte,
            MCR => r.mcr = byte & 0x1f,
            // LSR and MSR writes are factory-test features: ignored.
            LSR | MSR => {}
            _ => r.scr = byte,
        }
        r.update_irq();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;
    use crate::addr::Width;
    use crate::testing::RecordingIrq;

    fn at(offset: u64) -> Access {
        Access { offset, addr: 0x3f8 + offset, width: Width::U8, vcpu: None }
    }

    fn uart() -> (Uart16550, Arc<Mutex<Vec<u8>>>, Arc<RecordingIrq>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let irq = Arc::new(RecordingIrq::new());
        let u =
            Uart16550::new(move |b| sink.lock().extend_from_slice(b)).with_interrupt(irq.clone());
        (u, out, irq)
    }

    #[test]
    fn linux_probe_sequence_identifies_a_16550a() {
        let (u, _, _) = uart();
        // Scratch register test.
        u.write(at(SCR), 0xa5).unwrap();
        assert_eq!(u.read(at(SCR)).unwrap(), 0xa5);
        // Loopback: RTS|OUT2 must come back as CTS|DCD.
        u.write(at(MCR), u64::from(MCR_LOOP | 0x0a)).unwrap();
        assert_eq!(u.read(at(MSR)).unwrap() & 0xf0, 0x90);
        u.write(at(MCR), 0).unwrap();
        // FIFO enable shows in IIR's top bits: a 16550A.
        u.write(at(IIR_FCR), 0x01).unwrap();
        assert_eq!(u.read(at(IIR_FCR)).unwrap() & 0xc0, 0xc0);
        // Divisor latch is separate from THR/IER.
        u.write(at(LCR), u64::from(LCR_DLAB)).unwrap();
        u.write(at(0), 0x0c).unwrap();
        u.write(at(1), 0x00).unwrap();
        u.write(at(LCR), 0x03).unwrap();
        assert_eq!(u.read(at(IER_DLM)).unwrap(), 0);
        u.write(at(LCR), u64::from(LCR_DLAB | 0x03)).unwrap();
        assert_eq!(u.read(at(0)).unwrap(), 0x0c);
    }

    #[test]
    fn transmit_goes_out_and_thre_interrupt_follows_linux_rules() {
        let (u, out, irq) = uart();
        assert_eq!(u.read(at(LSR)).unwrap() & u64::from(LSR_THRE | LSR_TEMT), 0x60);
        for b in b"hi\n" {
            u.write(at(0), u64::from(*b)).unwrap();
        }
        assert_eq!(out.lock().as_slice(), b"hi\n");
        assert!(!irq.level(), "no interrupt while IER is clear");
        // Enabling THRI with THR empty raises the interrupt at once.
        u.write(at(IER_DLM), u64::from(IER_THRI)).unwrap();
        assert!(irq.level());
        assert_eq!(u.read(at(IIR_FCR)).unwrap() & 0x0f, u64::from(IIR_THRI));
        // That IIR read acknowledged it.
        assert!(!irq.level());
        assert_eq!(u.read(at(IIR_FCR)).unwrap() & 0x0f, u64::from(IIR_NONE));
        // Each transmitted byte empties THR again.
        u.write(at(0), u64::from(b'x')).unwrap();
        assert!(irq.level());
        u.write(at(IER_DLM), 0).unwrap();
        assert!(!irq.level());
    }

    #[test]
    fn receive_path_with_interrupts_and_overrun() {
        let (u, _, irq) = uart();
        u.write(at(IER_DLM), u64::from(IER_RDI | IER_RLSI)).unwrap();
        assert_eq!(u.push_input(b"ok"), 2);
        assert!(irq.level());
        assert_eq!(u.read(at(IIR_FCR)).unwrap() & 0x0f, u64::from(IIR_RDI));
        assert_eq!(u.read(at(LSR)).unwrap() & u64::from(LSR_DR), 1);
        assert_eq!(u.read(at(0)).unwrap(), u64::from(b'o'));
        assert_eq!(u.read(at(0)).unwrap(), u64::from(b'k'));
        assert!(!irq.level());
        assert_eq!(u.read(at(LSR)).unwrap() & u64::from(LSR_DR), 0);
        // An empty RBR reads as zero rather than faulting.
        assert_eq!(u.read(at(0)).unwrap(), 0);

        let big = alloc::vec![b'z'; RX_CAPACITY + 3];
        assert_eq!(u.push_input(&big), RX_CAPACITY);
        assert_eq!(u.read(at(IIR_FCR)).unwrap() & 0x0f, u64::from(IIR_RLSI));
        assert_ne!(u.read(at(LSR)).unwrap() & u64::from(LSR_OE), 0);
        // Reading LSR cleared the overrun; data is still there.
        assert_eq!(u.read(at(LSR)).unwrap() & u64::from(LSR_OE | LSR_DR), u64::from(LSR_DR));
        u.write(at(IIR_FCR), u64::from(FCR_ENABLE | FCR_CLEAR_RX)).unwrap();
        assert_eq!(u.read(at(LSR)).unwrap() & u64::from(LSR_DR), 0);
    }

    #[test]
    fn arbitrary_guest_accesses_never_panic_and_keep_lsr_sane() {
        let (u, _, _) = uart();
        let mut rng = crate::test_rng::Rng::new(0x2545_f491_4f6c_dd1d);
        let widths = [Width::U8, Width::U16, Width::U32, Width::U64];
        for _ in 0..if cfg!(miri) { 200 } else { 20_000 } {
            let rng = rng.next();
            let a = Access {
                offset: rng % 10,
                addr: 0,
                width: widths[(rng >> 8) as usize % 4],
                vcpu: None,
            };
            if rng & (1 << 20) == 0 {
                let _ = u.read(a);
            } else {
                let _ = u.write(a, rng >> 24);
            }
            if rng.is_multiple_of(97) {
                u.push_input(&[rng as u8]);
            }
        }
        // The transmitter is always ready, whatever the guest did.
        assert_eq!(u.read(at(LSR)).unwrap() & 0x60, 0x60);
    }

    #[test]
    fn accesses_wider_than_the_register_slot_are_refused_not_truncated() {
        let (u, out, _) = uart();
        for width in [Width::U16, Width::U32, Width::U64] {
            let wide = Access { width, ..at(0) };
            assert_eq!(u.write(wide, 0x4241), Err(DeviceError::InvalidWidth(width)));
            assert_eq!(u.read(Access { width, ..at(SCR) }), Err(DeviceError::InvalidWidth(width)));
        }
        assert!(out.lock().is_empty(), "a refused write transmits nothing");
        u.write(at(SCR), 0x5a).unwrap();
        assert_eq!(u.read(at(SCR)).unwrap(), 0x5a);

        // 32-bit-spaced registers take accesses up to their slot's width.
        let spaced = Uart16550::new(|_| {}).with_reg_shift(2);
        let slot = |width| Access { offset: SCR << 2, addr: 0, width, vcpu: None };
        spaced.write(slot(Width::U32), 0xdead_be5a).unwrap();
        assert_eq!(spaced.read(slot(Width::U32)).unwrap(), 0x5a);
        assert_eq!(spaced.read(slot(Width::U16)).unwrap(), 0x5a);
        assert_eq!(spaced.read(slot(Width::U64)), Err(DeviceError::InvalidWidth(Width::U64)));
    }

    #[test]
    fn loopback_feeds_receive_and_reg_shift_decodes_spaced_registers() {
        let (u, out, _) = uart();
        u.write(at(MCR), u64::from(MCR_LOOP)).unwrap();
        u.write(at(0), u64::from(b'q')).unwrap();
        assert!(out.lock().is_empty());
        assert_eq!(u.read(at(0)).unwrap(), u64::from(b'q'));

        let spaced = Uart16550::new(|_| {}).with_reg_shift(2);
        assert_eq!(spaced.window(), 32);
        spaced.write(at(SCR << 2), 0x5a).unwrap();
        assert_eq!(spaced.read(at(SCR << 2)).unwrap(), 0x5a);
        assert_eq!(spaced.read(at(1)), Err(DeviceError::InvalidOffset(1)));
        assert_eq!(u.read(at(8)), Err(DeviceError::InvalidOffset(8)));
    }
}

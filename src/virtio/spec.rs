//! The constants of the virtio specification (version 1.2) this crate
//! speaks: feature and status bits, device types, virtio-mmio register
//! offsets, split-ring flags and layout, and virtio-blk's feature bits,
//! configuration layout, request types and status values.
//!
//! Grouped by the spec section they come from; names follow the spec (and
//! Linux's headers), so a grep for a spec name finds its use here. The
//! values are written out rather than taken from `virtio-bindings`: that
//! crate gives feature *bit numbers* as `u32` where the device code works
//! with `u64` masks, and splits one concept over bindgen modules, so each
//! use site would convert; the spec's numbers do not change.

/// Feature bits defined by the virtio spec for every device type.
pub mod features {
    /// The driver may use indirect descriptor tables.
    pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` suppress interrupts and notifications.
    pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
    /// virtio 1.x (not legacy); a modern device must offer it.
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
    /// The device sits behind an IOMMU.
    pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueues.
    pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
    /// Buffers are used in the order they were made available.
    pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
    /// Platform-specific memory ordering.
    pub const VIRTIO_F_ORDER_PLATFORM: u64 = 1 << 36;
    /// Single-root I/O virtualization.
    pub const VIRTIO_F_SR_IOV: u64 = 1 << 37;
    /// The driver passes extra data with notifications.
    pub const VIRTIO_F_NOTIFICATION_DATA: u64 = 1 << 38;
    /// The driver passes config data with notifications.
    pub const VIRTIO_F_NOTIF_CONFIG_DATA: u64 = 1 << 39;
    /// Individual queues can be reset.
    pub const VIRTIO_F_RING_RESET: u64 = 1 << 40;
}

/// Bits of the device status register.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// virtio device type numbers (the DeviceID register).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// SCSI host.
    pub const SCSI: u32 = 8;
    /// 9P transport.
    pub const NINE_P: u32 = 9;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// "virt" in little-endian ASCII: the MagicValue register's content.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy virtio-mmio version (the Version register).
pub const MMIO_VERSION: u32 = 2;

/// Register offsets of the virtio-mmio transport (virtio 1.2, 4.2.2).
pub mod mmio {
    /// Magic value "virt" (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version, 2 (R).
    pub const VERSION: u64 = 0x004;
    /// Device type (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 feature bits selected by DeviceFeaturesSel (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects feature bits 0–31 (0) or 32–63 (1) (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 accepted feature bits selected by DriverFeaturesSel (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the DriverFeatures window (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers refer to (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue, 0 if it does not exist (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// The selected queue is ready (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification: the queue index (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt causes (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status; writing 0 resets (RW).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low half (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high half (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low half (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available ring address, high half (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring address, low half (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used ring address, high half (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Selects a shared memory region (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// Length of the selected region, low half; all-ones: none (R).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Length of the selected region, high half (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Base of the selected region, low half; all-ones: none (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Base of the selected region, high half (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Resets the selected queue (RW, with VIRTIO_F_RING_RESET only).
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// Config generation (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// InterruptStatus / InterruptACK bits of the virtio-mmio transport.
pub mod interrupt {
    /// Bit 0: a used buffer notification is pending.
    pub const USED_BUFFER: u32 = 1;
    /// Bit 1: a configuration change notification is pending.
    pub const CONFIG_CHANGE: u32 = 2;
}

/// Split virtqueue layout and flags (virtio 1.2, 2.7).
pub mod ring {
    /// Largest split queue the spec allows.
    pub const MAX_QUEUE_SIZE: u16 = 32768;
    /// Size of one descriptor in bytes.
    pub const DESC_SIZE: u64 = 16;
    /// Descriptor flag: the buffer continues in the descriptor named by `next`.
    pub const VIRTQ_DESC_F_NEXT: u16 = 1;
    /// Descriptor flag: the buffer is device-writable (otherwise device-readable).
    pub const VIRTQ_DESC_F_WRITE: u16 = 2;
    /// Descriptor flag: the buffer holds a table of indirect descriptors.
    pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
    /// Available ring flag: the driver asks for no used-buffer interrupts.
    pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
    /// Used ring flag: the device asks for no available-buffer notifications.
    pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
}

/// virtio-blk (virtio 1.2, 5.2).
pub mod blk {
    /// virtio-blk feature bits (virtio 1.2, 5.2.3).
    pub mod features {
        /// `size_max` holds the largest single buffer.
        pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
        /// `seg_max` holds the most data buffers per request.
        pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
        /// The disk is read-only.
        pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
        /// `blk_size` holds the optimal block size.
        pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
        /// FLUSH requests are served.
        pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
        /// `topology` is valid.
        pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
        /// The driver may switch the cache between writeback and writethrough.
        pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
        /// More than one request queue; `num_queues` says how many.
        pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
        /// DISCARD requests are served.
        pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
        /// WRITE_ZEROES requests are served.
        pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
    }

    /// Byte offsets of the fields of the virtio-blk configuration space.
    pub mod config_offset {
        /// `capacity: u64`, in 512-byte sectors.
        pub const CAPACITY: usize = 0;
        /// `size_max: u32`.
        pub const SIZE_MAX: usize = 8;
        /// `seg_max: u32`.
        pub const SEG_MAX: usize = 12;
        /// `blk_size: u32`.
        pub const BLK_SIZE: usize = 20;
        /// `topology.physical_block_exp: u8`.
        pub const PHYSICAL_BLOCK_EXP: usize = 24;
        /// `topology.alignment_offset: u8`.
        pub const ALIGNMENT_OFFSET: usize = 25;
        /// `topology.min_io_size: u16`.
        pub const MIN_IO_SIZE: usize = 26;
        /// `topology.opt_io_size: u32`.
        pub const OPT_IO_SIZE: usize = 28;
        /// `writeback: u8`: 1 writeback, 0 writethrough.
        pub const WRITEBACK: usize = 32;
        /// `num_queues: u16`.
        pub const NUM_QUEUES: usize = 34;
        /// `max_discard_sectors: u32`.
        pub const MAX_DISCARD_SECTORS: usize = 36;
        /// `max_discard_seg: u32`.
        pub const MAX_DISCARD_SEG: usize = 40;
        /// `discard_sector_alignment: u32`.
        pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
        /// `max_write_zeroes_sectors: u32`.
        pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
        /// `max_write_zeroes_seg: u32`.
        pub const MAX_WRITE_ZEROES_SEG: usize = 52;
        /// `write_zeroes_may_unmap: u8`.
        pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
        /// Size of the configuration space (padded to 4 bytes).
        pub const LEN: usize = 60;
    }

    /// `VIRTIO_BLK_T_IN`: read sectors into the writable buffers.
    pub const T_IN: u32 = 0;
    /// `VIRTIO_BLK_T_OUT`: write the readable buffers to sectors.
    pub const T_OUT: u32 = 1;
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    pub const T_FLUSH: u32 = 4;
    /// `VIRTIO_BLK_T_GET_ID`: the 20-byte device id string.
    pub const T_GET_ID: u32 = 8;
    /// `VIRTIO_BLK_T_DISCARD`: deallocate ranges.
    pub const T_DISCARD: u32 = 11;
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: zero ranges.
    pub const T_WRITE_ZEROES: u32 = 13;

    /// `VIRTIO_BLK_S_OK`.
    pub const S_OK: u8 = 0;
    /// `VIRTIO_BLK_S_IOERR`.
    pub const S_IOERR: u8 = 1;
    /// `VIRTIO_BLK_S_UNSUPP`.
    pub const S_UNSUPP: u8 = 2;

    /// Size of the request header `{type: u32, reserved: u32, sector: u64}`.
    pub const HEADER_LEN: usize = 16;
    /// Size of one discard / write-zeroes segment
    /// `{sector: u64, num_sectors: u32, flags: u32}`.
    pub const DWZ_SEGMENT_LEN: usize = 16;
    /// `flags` bit 0 of a discard / write-zeroes segment: unmap.
    pub const DWZ_FLAG_UNMAP: u32 = 1;
    /// Length of the device id returned by GET_ID.
    pub const ID_LEN: usize = 20;
    /// The sector size requests count in, whatever the disk's block size.
    pub const SECTOR_SIZE: u64 = 512;
}

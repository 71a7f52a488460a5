//! A type-0 PCI configuration space with write masks and BAR sizing.

/// Size of the configuration space we emulate (PCIe extended space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// Register index of BAR0.
pub const BAR0_REG: usize = 4;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
const COMMAND_REG: usize = 1;
const CAPABILITY_POINTER_REG: usize = 13;
/// Status register bit: a capability list is present.
const STATUS_CAPABILITIES: u32 = 1 << 20;
const BAR_MEM64: u32 = 0b100;

/// Identity of a PCI function.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (class, subclass, prog-if) in bits 23:0.
    pub class: u32,
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// One 64-bit memory BAR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bar64 {
    /// Guest-physical address the guest (or we) programmed.
    pub addr: u64,
    /// Size (a power of two).
    pub size: u64,
}

/// Register contents plus which bits the guest may write.
#[derive(Clone)]
pub struct PciConfigSpace {
    regs: Box<[u32; NUM_REGS]>,
    writable: Box<[u32; NUM_REGS]>,
    bars: [Option<Bar64>; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl std::fmt::Debug for PciConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigSpace")
            .field("id", &format_args!("{:#010x}", self.regs[0]))
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciConfigSpace {
    /// A type-0 header for `id`.
    pub fn new(id: PciIdentity) -> Self {
        let mut regs = Box::new([0u32; NUM_REGS]);
        let mut writable = Box::new([0u32; NUM_REGS]);
        regs[0] = u32::from(id.device) << 16 | u32::from(id.vendor);
        regs[2] = id.class << 8 | u32::from(id.revision);
        regs[11] = u32::from(id.subsystem) << 16 | u32::from(id.subsystem_vendor);
        // Command: I/O, memory, bus master, INTx disable are the guest's to set.
        writable[COMMAND_REG] = 0x0000_0407;
        // Interrupt line is scratch space for the OS.
        writable[15] = 0xff;
        PciConfigSpace {
            regs,
            writable,
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: 0x40,
        }
    }

    /// Declares a 64-bit memory BAR at slot `index` (it takes `index` and `index + 1`).
    pub fn add_bar64(&mut self, index: usize, bar: Bar64) {
        assert!(index + 1 < NUM_BARS && bar.size.is_power_of_two() && bar.size >= 16);
        self.bars[index] = Some(bar);
        let mask = !(bar.size - 1);
        self.regs[BAR0_REG + index] = (bar.addr as u32 & mask as u32) | BAR_MEM64;
        self.regs[BAR0_REG + index + 1] = (bar.addr >> 32) as u32;
        self.writable[BAR0_REG + index] = mask as u32 & !0xf;
        self.writable[BAR0_REG + index + 1] = (mask >> 32) as u32;
    }

    /// The current address of BAR `index`.
    pub fn bar(&self, index: usize) -> Option<Bar64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let addr = u64::from(self.regs[BAR0_REG + index] & !0xf)
            | u64::from(self.regs[BAR0_REG + index + 1]) << 32;
        Some(Bar64 { addr, ..bar })
    }

    /// Appends a capability (`body` starts after the ID/next bytes); returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> usize {
        let offset = self.next_capability;
        let len = (2 + body.len() + 3) & !3;
        assert!(
            offset + len <= 256,
            "capabilities overflow the legacy config space"
        );
        self.write_bytes(offset, &[id, 0]);
        self.write_bytes(offset + 2, body);
        match self.last_capability {
            Some(prev) => self.write_bytes(prev + 1, &[offset as u8]),
            None => {
                self.regs[CAPABILITY_POINTER_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAPABILITIES;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        offset
    }

    /// Lets the guest write `mask` bits of the register holding byte `offset`.
    pub fn set_writable(&mut self, reg: usize, mask: u32) {
        self.writable[reg] = mask;
    }

    /// Stores raw bytes (device side, no write mask).
    pub fn write_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let at = offset + i;
            let shift = (at % 4) * 8;
            let reg = &mut self.regs[at / 4];
            *reg = (*reg & !(0xff << shift)) | (u32::from(*byte) << shift);
        }
    }

    /// Reads register `reg`; out of range reads as all ones.
    pub fn read_register(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// A guest write of `data` at byte `offset` of register `reg`, honouring the write mask.
    pub fn write_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg >= NUM_REGS || offset as usize + data.len() > 4 {
            return;
        }
        let mut value_bytes = [0u8; 4];
        let mut mask_bytes = [0u8; 4];
        for (i, b) in data.iter().enumerate() {
            value_bytes[offset as usize + i] = *b;
            mask_bytes[offset as usize + i] = 0xff;
        }
        let mask = u32::from_le_bytes(mask_bytes) & self.writable[reg];
        let value = u32::from_le_bytes(value_bytes);
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciIdentity {
        PciIdentity {
            vendor: 0x1af4,
            device: 0x1058,
            class: 0xff_0000,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut cs = PciConfigSpace::new(id());
        cs.add_bar64(
            0,
            Bar64 {
                addr: 0xc000_0000,
                size: 0x10_0000,
            },
        );
        // The guest writes all ones and reads back the size mask.
        cs.write_register(BAR0_REG, 0, &[0xff; 4]);
        cs.write_register(BAR0_REG + 1, 0, &[0xff; 4]);
        assert_eq!(cs.read_register(BAR0_REG), 0xfff0_0000 | BAR_MEM64);
        assert_eq!(cs.read_register(BAR0_REG + 1), 0xffff_ffff);
        // Then programs an address.
        cs.write_register(BAR0_REG, 0, &0xd000_0000u32.to_le_bytes());
        cs.write_register(BAR0_REG + 1, 0, &1u32.to_le_bytes());
        assert_eq!(cs.bar(0).unwrap().addr, 0x1_d000_0000);
        // Read-only identity.
        cs.write_register(0, 0, &[0; 4]);
        assert_eq!(cs.read_register(0), 0x1058_1af4);
        // Out of range is ignored / all ones.
        cs.write_register(NUM_REGS, 0, &[0; 4]);
        cs.write_register(1, 3, &[0; 4]);
        assert_eq!(cs.read_register(NUM_REGS + 5), 0xffff_ffff);
    }

    #[test]
    fn capabilities_are_chained() {
        let mut cs = PciConfigSpace::new(id());
        let a = cs.add_capability(0x09, &[16, 1, 0, 0]);
        let b = cs.add_capability(0x11, &[0; 10]);
        assert_eq!(a, 0x40);
        assert_eq!(cs.read_register(CAPABILITY_POINTER_REG), 0x40);
        assert_ne!(cs.read_register(COMMAND_REG) & STATUS_CAPABILITIES, 0);
        assert_eq!((cs.read_register(a / 4) >> 8) & 0xff, b as u32);
    }
}

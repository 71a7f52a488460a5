//! The MSI-X table and pending-bit array of a virtio-pci function.

use std::sync::Arc;

use crate::vstate::interrupts::{MsiRouting, MsiVector};

/// "No vector" in virtio's MSI-X vector fields.
pub const NO_VECTOR: u16 = 0xffff;
const ENTRY_SIZE: u64 = 16;
const VECTOR_CTRL_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.ctrl & VECTOR_CTRL_MASKED != 0
    }
}

/// MSI-X state: one entry per vector, each backed by an irqfd and a GSI route.
#[derive(Debug)]
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    vectors: Vec<MsiVector>,
    routing: Arc<MsiRouting>,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    /// A table of `vectors` entries, all masked, as after reset.
    pub fn new(
        count: u16,
        routing: Arc<MsiRouting>,
    ) -> Result<Self, crate::vstate::interrupts::InterruptError> {
        let vectors = (0..count)
            .map(|_| routing.allocate_vector())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MsixTable {
            entries: vec![
                Entry {
                    ctrl: VECTOR_CTRL_MASKED,
                    ..Default::default()
                };
                usize::from(count)
            ],
            pending: vec![false; usize::from(count)],
            vectors,
            routing,
            enabled: false,
            function_masked: false,
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The guest changed the MSI-X message control (enable, function mask).
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) {
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.deliver_pending();
    }

    /// Reads the table (offset within it).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let value = self.table_dword(offset);
        let bytes = value.to_le_bytes();
        let start = (offset % 4) as usize;
        for (i, out) in data.iter_mut().enumerate() {
            *out = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    fn table_dword(&self, offset: u64) -> u32 {
        let Some(entry) = self.entries.get((offset / ENTRY_SIZE) as usize) else {
            return 0;
        };
        match (offset % ENTRY_SIZE) / 4 {
            0 => entry.addr_lo,
            1 => entry.addr_hi,
            2 => entry.data,
            _ => entry.ctrl,
        }
    }

    /// Writes the table; only aligned 4-byte (or 8-byte, split) writes are honoured.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !offset.is_multiple_of(4) || (data.len() != 4 && data.len() != 8) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.write_dword(offset + 4 * i as u64, value);
        }
    }

    fn write_dword(&mut self, offset: u64, value: u32) {
        let index = (offset / ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        match (offset % ENTRY_SIZE) / 4 {
            0 => entry.addr_lo = value,
            1 => entry.addr_hi = value,
            2 => entry.data = value,
            _ => entry.ctrl = value & VECTOR_CTRL_MASKED,
        }
        let entry = *entry;
        let message = (
            u64::from(entry.addr_hi) << 32 | u64::from(entry.addr_lo),
            entry.data,
        );
        if let Err(e) = self
            .routing
            .set_route(self.vectors[index].gsi, Some(message))
        {
            tracing::warn!("cannot route MSI-X vector {index}: {e}");
        }
        if !entry.masked() {
            self.deliver_pending();
        }
    }

    /// Reads the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let mut byte = 0u8;
            for bit in 0..8 {
                let vector = ((offset as usize + i) * 8) + bit;
                if self.pending.get(vector).copied().unwrap_or(false) {
                    byte |= 1 << bit;
                }
            }
            *out = byte;
        }
    }

    /// Raises `vector`, or marks it pending while masked. Returns whether it was delivered.
    pub fn trigger(&mut self, vector: u16) -> bool {
        let index = usize::from(vector);
        let Some(entry) = self.entries.get(index) else {
            return false;
        };
        if !self.enabled || self.function_masked || entry.masked() {
            self.pending[index] = true;
            return false;
        }
        self.vectors[index].irqfd.write(1).is_ok()
    }

    fn deliver_pending(&mut self) {
        for index in 0..self.entries.len() {
            if self.pending[index] {
                self.pending[index] = false;
                self.trigger(index as u16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of 3 vectors on a fresh VM with an irqchip, or `None` (loudly) without KVM.
    fn table() -> Option<MsixTable> {
        let vm = crate::vstate::vm::test_vm(true)?;
        Some(MsixTable::new(3, Arc::new(MsiRouting::new(vm))).unwrap())
    }

    fn write32(t: &mut MsixTable, offset: u64, value: u32) {
        t.write_table(offset, &value.to_le_bytes());
    }

    fn read32(t: &MsixTable, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read_table(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn pba(t: &MsixTable) -> u8 {
        let mut data = [0u8; 1];
        t.read_pba(0, &mut data);
        data[0]
    }

    /// Programs vector `index` with an address and data, unmasked.
    fn program(t: &mut MsixTable, index: u64) {
        let base = index * ENTRY_SIZE;
        write32(t, base, 0xfee0_0000);
        write32(t, base + 4, 0);
        write32(t, base + 8, 0x40 + index as u32);
        write32(t, base + 12, 0);
    }

    #[test]
    fn entries_start_masked_and_read_back_what_was_written() {
        let Some(mut t) = table() else {
            return;
        };
        assert_eq!(t.len(), 3);
        for index in 0..3 {
            assert_eq!(read32(&t, index * ENTRY_SIZE + 12), VECTOR_CTRL_MASKED);
        }
        program(&mut t, 1);
        assert_eq!(read32(&t, ENTRY_SIZE), 0xfee0_0000);
        assert_eq!(read32(&t, ENTRY_SIZE + 8), 0x41);
        // Only the mask bit of vector control is writable.
        write32(&mut t, ENTRY_SIZE + 12, 0xffff_ffff);
        assert_eq!(read32(&t, ENTRY_SIZE + 12), VECTOR_CTRL_MASKED);
        // Partial-dword and misaligned writes are ignored; so is anything past the table.
        t.write_table(ENTRY_SIZE + 8, &[0x99, 0x99]);
        t.write_table(ENTRY_SIZE + 9, &0x1234_5678u32.to_le_bytes());
        assert_eq!(read32(&t, ENTRY_SIZE + 8), 0x41);
        write32(&mut t, 3 * ENTRY_SIZE, 0xdead_beef);
        assert_eq!(read32(&t, 3 * ENTRY_SIZE), 0);
        assert_eq!(read32(&t, u64::MAX - 3), 0);
        // A byte read of a dword field.
        let mut byte = [0u8; 1];
        t.read_table(ENTRY_SIZE + 8, &mut byte);
        assert_eq!(byte[0], 0x41);
    }

    #[test]
    fn masked_vectors_are_pending_and_delivered_on_unmask() {
        let Some(mut t) = table() else {
            return;
        };
        t.set_control(true, false);
        // Masked (as after reset): pending, not delivered.
        // (KVM consumes the irqfd itself, so delivery shows as `trigger`'s answer and a
        // cleared pending bit.)
        assert!(!t.trigger(0));
        assert_eq!(pba(&t), 0b001);
        program(&mut t, 0);
        assert_eq!(pba(&t), 0, "unmasking delivers the pending message");
        assert!(t.trigger(0));
        // Function mask and disabled MSI-X hold every vector.
        program(&mut t, 2);
        t.set_control(true, true);
        assert!(!t.trigger(2));
        assert_eq!(pba(&t), 0b100);
        t.set_control(false, false);
        assert_eq!(pba(&t), 0b100, "still pending while MSI-X is off");
        t.set_control(true, false);
        assert_eq!(pba(&t), 0);
        assert!(t.trigger(2));
        // A vector beyond the table, as NO_VECTOR or a guest's garbage, fires nothing.
        assert!(!t.trigger(NO_VECTOR));
        assert!(!t.trigger(3));
        assert_eq!(pba(&t), 0);
    }
}

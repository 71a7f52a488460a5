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

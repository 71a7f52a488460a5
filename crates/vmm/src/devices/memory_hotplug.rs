//! The ACPI memory hotplug controller: the register block the DSDT's `\_SB.MHPC` methods
//! talk to, one slot at a time, to find DIMMs, read their ranges and nodes, acknowledge
//! insert and remove events, report `_OST` status and eject.
//!
//! The layout is QEMU's (docs/specs/acpi_mem_hotplug.rst), on MMIO instead of port 0xa00:
//!
//! ```text
//! read   0x00 base low   0x04 base high   0x08 size low   0x0c size high   0x10 proximity
//!        0x14 status byte: bit0 enabled, bit1 insert pending, bit2 remove pending
//! write  0x00 slot selector   0x04 _OST event   0x08 _OST status (the pair is recorded)
//!        0x14 control byte: bit1 clear insert, bit2 clear remove, bit3 eject
//! ```
//!
//! A selector out of range makes reads return all ones and writes do nothing. The guest owns
//! nothing here: every value it writes is checked, and an eject of a slot that holds no DIMM
//! is ignored.

use crate::arch::x86_64::layout::GuestRange;
use crate::vstate::{ExitRequester, VmEvent};

use super::BusDevice;

/// Size of the register block.
pub const MEMORY_HOTPLUG_REGISTERS_SIZE: u64 = 0x18;

/// Register offsets.
pub mod reg {
    /// Read: base address bits 0-31. Write: slot selector.
    pub const BASE_LOW_OR_SELECTOR: u64 = 0x00;
    /// Read: base address bits 32-63. Write: `_OST` source event.
    pub const BASE_HIGH_OR_OST_EVENT: u64 = 0x04;
    /// Read: size bits 0-31. Write: `_OST` status code.
    pub const SIZE_LOW_OR_OST_STATUS: u64 = 0x08;
    /// Read: size bits 32-63.
    pub const SIZE_HIGH: u64 = 0x0c;
    /// Read: proximity domain.
    pub const PROXIMITY: u64 = 0x10;
    /// Read: status bits. Write: control bits.
    pub const STATUS_OR_CONTROL: u64 = 0x14;
}

/// Bits of the status/control byte.
pub mod bits {
    /// Status: the slot holds a DIMM the guest may use.
    pub const ENABLED: u8 = 1 << 0;
    /// Status: an insertion waits for the guest. Control: the guest saw it.
    pub const INSERT: u8 = 1 << 1;
    /// Status: a removal request waits for the guest. Control: the guest saw it.
    pub const REMOVE: u8 = 1 << 2;
    /// Control: eject (the guest's `_EJ0`).
    pub const EJECT: u8 = 1 << 3;
}

/// `_OST` source events (ACPI 6.5, 6.3.5) the controller interprets.
pub mod ost {
    /// Device check: the guest handled an insertion.
    pub const EVENT_DEVICE_CHECK: u32 = 0x01;
    /// Eject request from the platform.
    pub const EVENT_EJECT_REQUEST: u32 = 0x03;
    /// Eject started by the guest itself.
    pub const EVENT_OSPM_EJECT: u32 = 0x103;
    /// Success.
    pub const SUCCESS: u32 = 0x00;
    /// Eject: still in progress (not a final answer).
    pub const EJECT_IN_PROGRESS: u32 = 0x84;
}

/// What an `_OST` status code means for the event it answers.
pub fn ost_meaning(event: u32, status: u32) -> String {
    let eject = matches!(event, ost::EVENT_EJECT_REQUEST | ost::EVENT_OSPM_EJECT);
    let text = match (status, eject) {
        (0x00, _) => "success",
        (0x01, _) => "non-specific failure",
        (0x02, _) => "unrecognized notify",
        (0x80, true) => "removal not supported (hotplug disabled in the guest)",
        (0x81, true) => "device in use by an application",
        (0x82, true) => "device busy (the guest could not offline the memory)",
        (0x83, true) => "ejection dependency busy",
        (0x84, true) => "ejection in progress",
        (0x80, false) => "insertion in progress",
        (0x81, false) => "driver load failure",
        (0x82, false) => "insertion not supported",
        _ => "unknown status",
    };
    format!("{text} (event {event:#x}, status {status:#x})")
}

/// Where a slot's DIMM is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlotState {
    /// No DIMM.
    #[default]
    Empty,
    /// Mapped and announced; the guest has not confirmed the insertion yet.
    Inserting,
    /// The guest confirmed it (`_OST` success for a device check) or found it at boot.
    Active,
    /// The guest was asked to eject it and has neither ejected it nor refused.
    Removing,
    /// The guest called `_EJ0`: `_STA` reads 0 while the VMM takes the memory away.
    Ejected,
}

impl SlotState {
    /// Whether the guest may use the DIMM (`_STA` 0xF).
    pub fn enabled(self) -> bool {
        matches!(
            self,
            SlotState::Inserting | SlotState::Active | SlotState::Removing
        )
    }
}

/// One `_OST` report of the guest: the event it answers and its status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ost {
    /// Source event ([`ost`] constants).
    pub event: u32,
    /// Status code.
    pub status: u32,
}

impl Ost {
    /// Both, in words.
    pub fn meaning(&self) -> String {
        ost_meaning(self.event, self.status)
    }
}

/// One DIMM slot as the guest sees it, plus what the VMM tracks of its life.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DimmSlot {
    /// The DIMM's guest-physical range; `None` for an empty slot.
    pub range: Option<GuestRange>,
    /// Its proximity domain.
    pub node: u32,
    /// Where the DIMM is in its life.
    pub state: SlotState,
    /// Status bit: an insert event waits for the guest's scan.
    pub insert_pending: bool,
    /// Status bit: a remove event waits for the guest's scan.
    pub remove_pending: bool,
    /// The `_OST` with which the guest refused the last removal.
    pub removal_refused: Option<Ost>,
    /// The guest's last `_OST` report.
    pub last_ost: Option<Ost>,
}

/// The controller: slot table and the guest's current selector.
#[derive(Debug)]
pub struct MemoryHotplugController {
    slots: Vec<DimmSlot>,
    selected: u32,
    ost_event: u32,
    exit: ExitRequester,
}

impl MemoryHotplugController {
    /// A controller with `slots` empty slots; ejects are sent to `exit` as
    /// [`VmEvent::DimmEjected`].
    pub fn new(slots: u32, exit: ExitRequester) -> Self {
        MemoryHotplugController {
            slots: vec![DimmSlot::default(); slots as usize],
            selected: 0,
            ost_event: 0,
            exit,
        }
    }

    /// The slot table.
    pub fn slots(&self) -> &[DimmSlot] {
        &self.slots
    }

    /// Puts a DIMM in `slot`. `at_boot`: the guest finds it in its boot-time ACPI scan, so
    /// no insert event is raised.
    pub fn insert(&mut self, slot: u32, range: GuestRange, node: u32, at_boot: bool) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = DimmSlot {
                range: Some(range),
                node,
                state: if at_boot {
                    SlotState::Active
                } else {
                    SlotState::Inserting
                },
                insert_pending: !at_boot,
                ..DimmSlot::default()
            };
        }
    }

    /// Asks the guest to give back the DIMM in `slot`; false if the slot is empty or
    /// already ejected.
    pub fn request_removal(&mut self, slot: u32) -> bool {
        match self.slots.get_mut(slot as usize) {
            // Asking again while a removal is pending raises the event again.
            Some(s) if s.state.enabled() => {
                s.remove_pending = true;
                s.state = SlotState::Removing;
                s.removal_refused = None;
                true
            }
            _ => false,
        }
    }

    /// Empties `slot` once the VMM has taken the DIMM's memory away.
    pub fn release(&mut self, slot: u32) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = DimmSlot::default();
        }
    }

    fn selected_slot(&mut self) -> Option<&mut DimmSlot> {
        self.slots.get_mut(self.selected as usize)
    }

    /// The 32-bit register at the dword-aligned `offset`, for the selected slot.
    fn read_register(&mut self, offset: u64) -> u32 {
        let Some(slot) = self.selected_slot() else {
            return u32::MAX;
        };
        let enabled = slot.state.enabled();
        let range = slot
            .range
            .filter(|_| enabled)
            .unwrap_or(GuestRange { start: 0, size: 0 });
        match offset {
            reg::BASE_LOW_OR_SELECTOR => range.start as u32,
            reg::BASE_HIGH_OR_OST_EVENT => (range.start >> 32) as u32,
            reg::SIZE_LOW_OR_OST_STATUS => range.size as u32,
            reg::SIZE_HIGH => (range.size >> 32) as u32,
            reg::PROXIMITY => slot.node,
            reg::STATUS_OR_CONTROL => {
                let mut status = 0u8;
                if enabled {
                    status |= bits::ENABLED;
                }
                if slot.insert_pending {
                    status |= bits::INSERT;
                }
                if slot.remove_pending {
                    status |= bits::REMOVE;
                }
                u32::from(status)
            }
            _ => 0,
        }
    }

    fn record_ost(&mut self, status: u32) {
        let event = self.ost_event;
        let selected = self.selected;
        let Some(slot) = self.selected_slot() else {
            return;
        };
        let report = Ost { event, status };
        slot.last_ost = Some(report);
        match (event, slot.state) {
            (ost::EVENT_DEVICE_CHECK, SlotState::Inserting | SlotState::Active) => {
                slot.state = if status == ost::SUCCESS {
                    SlotState::Active
                } else {
                    SlotState::Inserting
                };
            }
            (ost::EVENT_EJECT_REQUEST | ost::EVENT_OSPM_EJECT, SlotState::Removing)
                if status != ost::SUCCESS && status != ost::EJECT_IN_PROGRESS =>
            {
                // The guest gave up: the DIMM stays, fully usable.
                slot.state = SlotState::Active;
                slot.remove_pending = false;
                crate::guest_warn!(
                    "the guest refused to eject DIMM slot {selected}: {}",
                    report.meaning()
                );
                slot.removal_refused = Some(report);
            }
            _ => {}
        }
    }

    fn write_control(&mut self, control: u8) {
        let selected = self.selected;
        let Some(slot) = self.selected_slot() else {
            return;
        };
        if control & bits::INSERT != 0 {
            slot.insert_pending = false;
        }
        if control & bits::REMOVE != 0 {
            slot.remove_pending = false;
        }
        if control & bits::EJECT != 0 && slot.state.enabled() {
            // `_STA` must read 0 as soon as `_EJ0` returns, or Linux reports an incomplete
            // eject; the memory itself goes away in the memory service.
            slot.state = SlotState::Ejected;
            slot.remove_pending = false;
            self.exit.request(VmEvent::DimmEjected { slot: selected });
        }
    }
}

impl BusDevice for MemoryHotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() > 4 || offset >= MEMORY_HOTPLUG_REGISTERS_SIZE {
            return;
        }
        let aligned = offset & !3;
        let shift = (offset - aligned) as usize;
        let value = self.read_register(aligned).to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = value.get(shift + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 4 {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        match offset {
            reg::BASE_LOW_OR_SELECTOR => self.selected = value,
            reg::BASE_HIGH_OR_OST_EVENT => self.ost_event = value,
            reg::SIZE_LOW_OR_OST_STATUS => self.record_ost(value),
            reg::STATUS_OR_CONTROL => self.write_control(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn controller() -> (MemoryHotplugController, std::sync::mpsc::Receiver<VmEvent>) {
        let (exit, rx) = ExitRequester::for_test();
        (MemoryHotplugController::new(4, exit), rx)
    }

    fn read32(c: &mut MemoryHotplugController, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        c.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn status(c: &mut MemoryHotplugController) -> u8 {
        let mut data = [0u8; 1];
        c.read(reg::STATUS_OR_CONTROL, &mut data);
        data[0]
    }

    fn select(c: &mut MemoryHotplugController, slot: u32) {
        c.write(reg::BASE_LOW_OR_SELECTOR, &slot.to_le_bytes());
    }

    #[test]
    fn a_selected_slot_shows_its_dimm() {
        let (mut c, _rx) = controller();
        let range = GuestRange {
            start: 0x1_4000_0000,
            size: 3 * GIB,
        };
        c.insert(2, range, 1, false);
        select(&mut c, 2);
        assert_eq!(read32(&mut c, reg::BASE_LOW_OR_SELECTOR), 0x4000_0000);
        assert_eq!(read32(&mut c, reg::BASE_HIGH_OR_OST_EVENT), 1);
        assert_eq!(read32(&mut c, reg::SIZE_LOW_OR_OST_STATUS), 0xC000_0000);
        assert_eq!(read32(&mut c, reg::SIZE_HIGH), 0);
        assert_eq!(read32(&mut c, reg::PROXIMITY), 1);
        assert_eq!(status(&mut c), bits::ENABLED | bits::INSERT);
        // A byte read in the middle of a register.
        let mut byte = [0u8; 1];
        c.read(reg::BASE_LOW_OR_SELECTOR + 3, &mut byte);
        assert_eq!(byte[0], 0x40);
        // The guest acknowledges the insert event, then confirms with _OST.
        c.write(reg::STATUS_OR_CONTROL, &[bits::INSERT]);
        assert_eq!(status(&mut c), bits::ENABLED);
        assert_eq!(c.slots()[2].state, SlotState::Inserting);
        c.write(reg::BASE_HIGH_OR_OST_EVENT, &1u32.to_le_bytes());
        c.write(reg::SIZE_LOW_OR_OST_STATUS, &0u32.to_le_bytes());
        assert_eq!(c.slots()[2].state, SlotState::Active);
        assert_eq!(
            c.slots()[2].last_ost,
            Some(Ost {
                event: 1,
                status: 0
            })
        );
        // Other slots are empty.
        select(&mut c, 0);
        assert_eq!(status(&mut c), 0);
        assert_eq!(read32(&mut c, reg::SIZE_LOW_OR_OST_STATUS), 0);
    }

    #[test]
    fn eject_disables_at_once_and_tells_the_control_loop() {
        let (mut c, rx) = controller();
        let range = GuestRange {
            start: 8 * GIB,
            size: GIB,
        };
        c.insert(1, range, 0, true);
        assert!(c.request_removal(1));
        select(&mut c, 1);
        assert_eq!(status(&mut c), bits::ENABLED | bits::REMOVE);
        c.write(reg::STATUS_OR_CONTROL, &[bits::REMOVE]);
        c.write(reg::STATUS_OR_CONTROL, &[bits::EJECT]);
        assert_eq!(status(&mut c), 0, "_STA must read 0 right after _EJ0");
        assert!(matches!(
            rx.try_recv().unwrap(),
            VmEvent::DimmEjected { slot: 1 }
        ));
        // A second eject of the same slot is not reported twice.
        c.write(reg::STATUS_OR_CONTROL, &[bits::EJECT]);
        assert!(rx.try_recv().is_err());
        c.release(1);
        assert_eq!(c.slots()[1], DimmSlot::default());
        assert!(!c.request_removal(1));
    }

    #[test]
    fn a_refused_eject_leaves_the_dimm_in_place() {
        let (mut c, rx) = controller();
        c.insert(
            0,
            GuestRange {
                start: 8 * GIB,
                size: GIB,
            },
            0,
            true,
        );
        assert!(c.request_removal(0));
        select(&mut c, 0);
        for (event, status) in [(3u32, 0x84u32), (3, 0x82)] {
            c.write(reg::BASE_HIGH_OR_OST_EVENT, &event.to_le_bytes());
            c.write(reg::SIZE_LOW_OR_OST_STATUS, &status.to_le_bytes());
        }
        let slot = &c.slots()[0];
        assert_eq!(slot.state, SlotState::Active, "usable again");
        assert!(slot.removal_refused.unwrap().meaning().contains("busy"));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn hostile_accesses_are_harmless() {
        let (mut c, rx) = controller();
        select(&mut c, 99);
        assert_eq!(read32(&mut c, reg::PROXIMITY), u32::MAX);
        c.write(reg::STATUS_OR_CONTROL, &[0xff]);
        c.write(reg::SIZE_LOW_OR_OST_STATUS, &[1, 2, 3, 4]);
        select(&mut c, 0);
        // Eject of an empty slot, odd sizes and offsets.
        c.write(reg::STATUS_OR_CONTROL, &[bits::EJECT]);
        c.write(0x17, &[0xff]);
        c.write(0, &[]);
        c.write(0, &[0; 8]);
        let mut big = [0xaau8; 8];
        c.read(0, &mut big);
        assert_eq!(big, [0; 8]);
        let mut past = [0xaau8; 4];
        c.read(0x40, &mut past);
        assert_eq!(past, [0; 4]);
        assert!(rx.try_recv().is_err());
        assert!(c.slots().iter().all(|s| *s == DimmSlot::default()));
    }
}

//! The ACPI DIMM controller's registers (`MemoryHotplugController`) under arbitrary guest
//! reads and writes, interleaved with the host's inserts, removal requests and releases.
//!
//! Invariants: nothing panics; an eject event is sent only for the selected slot, and only
//! when that slot held an enabled DIMM; the ejected slot then reads as not enabled (`_STA` 0)
//! with base and size 0; a disabled or empty slot never shows a range; reads past the
//! registers or wider than 4 bytes give zeros.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tidevm_vmm::arch::x86_64::layout::GuestRange;
use tidevm_vmm::devices::memory_hotplug::{
    bits, reg, MemoryHotplugController, SlotState, MEMORY_HOTPLUG_REGISTERS_SIZE,
};
use tidevm_vmm::devices::BusDevice;
use tidevm_vmm::vstate::{ExitRequester, VmEvent};

const SLOTS: u32 = 4;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u8, len: u8 },
    Write { offset: u8, data: Vec<u8> },
    Select(u8),
    Control(u8),
    Ost { event: u8, status: u8 },
    Insert { slot: u8, gib: u8, at_boot: bool },
    RequestRemoval(u8),
    Release(u8),
}

fn ost_code(b: u8) -> u32 {
    // The codes that mean something, plus anything.
    [0, 1, 3, 0x103, 0x80, 0x84, 0x81, u32::from(b) << 8][usize::from(b % 8)]
}

fuzz_target!(|ops: Vec<Op>| {
    let events: Arc<Mutex<Vec<VmEvent>>> = Arc::default();
    let sink = events.clone();
    let exit = ExitRequester::new(move |e| sink.lock().unwrap().push(e));
    let mut c = MemoryHotplugController::new(SLOTS, exit);
    // The guest's selector, tracked on the side (the controller's is private).
    let mut selected: u32 = 0;
    for op in ops.iter().take(128) {
        let before: Vec<SlotState> = c.slots().iter().map(|s| s.state).collect();
        match *op {
            Op::Read { offset, len } => {
                let offset = u64::from(offset) % (MEMORY_HOTPLUG_REGISTERS_SIZE + 8);
                let mut data = vec![0xeeu8; usize::from(len % 9)];
                c.read(offset, &mut data);
                if data.len() > 4 || offset >= MEMORY_HOTPLUG_REGISTERS_SIZE {
                    assert!(data.iter().all(|b| *b == 0), "read outside the registers");
                }
            }
            Op::Write { offset, ref data } => {
                let offset = u64::from(offset) % (MEMORY_HOTPLUG_REGISTERS_SIZE + 8);
                let data = &data[..data.len().min(8)];
                if offset == reg::BASE_LOW_OR_SELECTOR && (1..=4).contains(&data.len()) {
                    let mut b = [0u8; 4];
                    b[..data.len()].copy_from_slice(data);
                    selected = u32::from_le_bytes(b);
                }
                c.write(offset, data);
            }
            Op::Select(s) => {
                selected = u32::from(s % (SLOTS as u8 + 2));
                c.write(reg::BASE_LOW_OR_SELECTOR, &selected.to_le_bytes());
            }
            Op::Control(b) => c.write(reg::STATUS_OR_CONTROL, &[b]),
            Op::Ost { event, status } => {
                c.write(reg::BASE_HIGH_OR_OST_EVENT, &ost_code(event).to_le_bytes());
                c.write(reg::SIZE_LOW_OR_OST_STATUS, &ost_code(status).to_le_bytes());
            }
            Op::Insert { slot, gib, at_boot } => {
                let range = GuestRange {
                    start: (8 + u64::from(gib)) << 30,
                    size: 128 << 20,
                };
                c.insert(u32::from(slot % (SLOTS as u8 + 1)), range, 0, at_boot);
            }
            Op::RequestRemoval(s) => {
                let slot = u32::from(s % (SLOTS as u8 + 1));
                let ok = c.request_removal(slot);
                let was_enabled = before.get(slot as usize).is_some_and(|s| s.enabled());
                assert_eq!(ok, was_enabled, "removal of slot {slot} in {before:?}");
            }
            Op::Release(s) => c.release(u32::from(s % (SLOTS as u8 + 1))),
        }
        for event in events.lock().unwrap().drain(..) {
            let VmEvent::DimmEjected { slot } = event else {
                panic!("unexpected event {event:?}");
            };
            assert_eq!(slot, selected, "eject of a slot the guest did not select");
            let state = before.get(slot as usize).copied();
            assert!(
                state.is_some_and(SlotState::enabled),
                "eject of slot {slot} in state {state:?}"
            );
            assert_eq!(c.slots()[slot as usize].state, SlotState::Ejected);
        }
        // What the guest reads for the selected slot agrees with the slot table.
        let mut status = [0u8; 1];
        c.read(reg::STATUS_OR_CONTROL, &mut status);
        let mut size = [0u8; 4];
        c.read(reg::SIZE_LOW_OR_OST_STATUS, &mut size);
        match c.slots().get(selected as usize) {
            Some(slot) => {
                assert_eq!(status[0] & bits::ENABLED != 0, slot.state.enabled());
                if !slot.state.enabled() {
                    assert_eq!(u32::from_le_bytes(size), 0, "a disabled slot shows a size");
                }
                if slot.range.is_none() {
                    assert_eq!(slot.state, SlotState::Empty);
                }
            }
            None => {
                assert_eq!(status[0], 0xff, "a slot that does not exist");
            }
        }
    }
});

//! AML for ACPI DIMM hotplug: the `\_SB.MHPC` container with one PNP0C80 memory device per
//! slot, whose `_STA`, `_CRS`, `_PXM`, `_OST` and `_EJ0` talk to the memory hotplug
//! controller's registers (`devices/memory_hotplug.rs`), and `MSCN`, which the GED's `_EVT`
//! calls to deliver insert (Notify 1) and eject-request (Notify 3) events.
//!
//! The method names follow QEMU's (`MSCN`, `MCRS`, ...), which guests have run for a decade.

use acpi_tables::aml::{
    self, Acquire, Add, AddressSpace, AddressSpaceCacheable, Arg, CreateQWordField, Device,
    EISAName, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    LessThan, Local, Method, MethodCall, Mutex, Name, Notify, OpRegion, OpRegionSpace, Or, Path,
    Release, ResourceTemplate, Return, ShiftLeft, Store, Subtract, While,
};

use acpi_tables::Aml;

use super::dsdt::{encode, Owned};
use crate::devices::memory_hotplug::MEMORY_HOTPLUG_REGISTERS_SIZE;

/// Path of the container (the GED's `_EVT` calls its `MSCN`).
pub const CONTAINER: &str = "\\_SB_.MHPC";
/// Most slots the AML can name (`MP00`..`MPFF`).
pub const MAX_SLOTS: u32 = 256;

fn method_path(name: &str) -> Path {
    Path::new(&format!("{CONTAINER}.{name}"))
}

/// Name of the memory device of `slot`.
pub fn slot_device_name(slot: u32) -> String {
    format!("MP{slot:02X}")
}

/// The container, its register fields and methods, and one device per slot.
pub(super) fn memory_hotplug_aml(slots: u32, registers: u64) -> Owned {
    let slots = slots.min(MAX_SLOTS);
    let slot_count = Name::new("MDNR".into(), &slots);
    let (address, length) = (registers as usize, MEMORY_HOTPLUG_REGISTERS_SIZE as usize);
    let region = OpRegion::new(
        "HPMR".into(),
        OpRegionSpace::SystemMemory,
        &address,
        &length,
    );
    // Reads: the selected DIMM's base, size and proximity.
    let read_fields = Field::new(
        "HPMR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![
            FieldEntry::Named(*b"MRBL", 32),
            FieldEntry::Named(*b"MRBH", 32),
            FieldEntry::Named(*b"MRLL", 32),
            FieldEntry::Named(*b"MRLH", 32),
            FieldEntry::Named(*b"MPX_", 32),
        ],
    );
    // The status/control byte: writing a one to a bit acts on that bit only.
    let status_fields = Field::new(
        "HPMR".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Reserved(0x14 * 8),
            FieldEntry::Named(*b"MES_", 1),
            FieldEntry::Named(*b"MINS", 1),
            FieldEntry::Named(*b"MRMV", 1),
            FieldEntry::Named(*b"MEJ_", 1),
        ],
    );
    // Writes: slot selector and the _OST pair.
    let write_fields = Field::new(
        "HPMR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"MSEL", 32),
            FieldEntry::Named(*b"MOEV", 32),
            FieldEntry::Named(*b"MOSC", 32),
        ],
    );
    let lock = Mutex::new("MLCK".into(), 0);

    let methods = [
        scan_method(),
        notify_method(slots),
        status_method(),
        resources_method(),
        proximity_method(),
        ost_method(),
        eject_method(),
    ];
    let devices: Vec<Owned> = (0..slots).map(slot_device).collect();

    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A06"));
    let uid = Name::new("_UID".into(), &"DIMM devices");
    let mut children: Vec<&dyn Aml> = vec![
        &hid,
        &uid,
        &slot_count,
        &region,
        &read_fields,
        &status_fields,
        &write_fields,
        &lock,
    ];
    for m in &methods {
        children.push(m);
    }
    for d in &devices {
        children.push(d);
    }
    encode(&Device::new(CONTAINER.into(), children))
}

fn acquire() -> Acquire {
    Acquire::new("MLCK".into(), 0xffff)
}

fn release() -> Release {
    Release::new("MLCK".into())
}

/// `MSCN()`: for every slot with a pending event, notify its device and acknowledge.
fn scan_method() -> Owned {
    let f_mdnr = Path::new("MDNR");
    let f_mins = Path::new("MINS");
    let f_mrmv = Path::new("MRMV");
    let f_msel = Path::new("MSEL");
    let slot = Local(0);
    let select = Store::new(&f_msel, &slot);
    let insert_pending = Equal::new(&f_mins, &aml::ONE);
    let notify_insert = MethodCall::new("MTFY".into(), vec![&slot, &aml::ONE]);
    let clear_insert = Store::new(&f_mins, &aml::ONE);
    let on_insert = If::new(&insert_pending, vec![&notify_insert, &clear_insert]);
    let remove_pending = Equal::new(&f_mrmv, &aml::ONE);
    let eject_request = 3u8;
    let notify_remove = MethodCall::new("MTFY".into(), vec![&slot, &eject_request]);
    let clear_remove = Store::new(&f_mrmv, &aml::ONE);
    let on_remove = If::new(&remove_pending, vec![&notify_remove, &clear_remove]);
    let next = Add::new(&slot, &slot, &aml::ONE);
    let more = LessThan::new(&slot, &f_mdnr);
    let each_slot = While::new(&more, vec![&select, &on_insert, &on_remove, &next]);
    let start = Store::new(&slot, &aml::ZERO);
    let (acquire, release) = (acquire(), release());
    encode(&Method::new(
        "MSCN".into(),
        0,
        true,
        vec![&acquire, &start, &each_slot, &release],
    ))
}

/// `MTFY(slot, code)`: Notify the slot's device (AML cannot build a name at run time).
fn notify_method(slots: u32) -> Owned {
    let names: Vec<String> = (0..slots).map(slot_device_name).collect();
    let paths: Vec<Path> = names.iter().map(|n| Path::new(n)).collect();
    let notifies: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &Arg(1))).collect();
    let indices: Vec<u32> = (0..slots).collect();
    let conditions: Vec<Equal> = indices.iter().map(|i| Equal::new(&Arg(0), i)).collect();
    let ifs: Vec<If> = conditions
        .iter()
        .zip(&notifies)
        .map(|(c, n)| If::new(c, vec![n]))
        .collect();
    let body: Vec<&dyn Aml> = ifs.iter().map(|i| i as &dyn Aml).collect();
    encode(&Method::new("MTFY".into(), 2, false, body))
}

/// A method on the slot in `Arg0`: under the lock, select the slot and run `body`; after
/// releasing the lock, return `result` if there is one.
fn slot_method(
    name: &str,
    args: u8,
    serialized: bool,
    body: &[&dyn Aml],
    result: Option<&dyn Aml>,
) -> Owned {
    let f_msel = Path::new("MSEL");
    let select = Store::new(&f_msel, &Arg(0));
    let (acquire, release) = (acquire(), release());
    let ret = result.map(Return::new);
    let mut statements: Vec<&dyn Aml> = vec![&acquire, &select];
    statements.extend_from_slice(body);
    statements.push(&release);
    if let Some(ret) = &ret {
        statements.push(ret);
    }
    encode(&Method::new(name.into(), args, serialized, statements))
}

/// `MSTA(slot)`: 0xF (present, enabled, shown, functioning) when the slot holds a DIMM.
fn status_method() -> Owned {
    let f_mes = Path::new("MES_");
    let result = Local(0);
    let absent = Store::new(&result, &aml::ZERO);
    let enabled = Equal::new(&f_mes, &aml::ONE);
    let present = 0x0fu8;
    let set_present = Store::new(&result, &present);
    let when_enabled = If::new(&enabled, vec![&set_present]);
    slot_method("MSTA", 1, false, &[&absent, &when_enabled], Some(&result))
}

/// `MCRS(slot)`: a QWordMemory resource with the DIMM's range.
fn resources_method() -> Owned {
    let f_lenl = Path::new("LENL");
    let f_maxl = Path::new("MAXL");
    let f_minl = Path::new("MINL");
    let f_mr64 = Path::new("MR64");
    let f_mrbh = Path::new("MRBH");
    let f_mrbl = Path::new("MRBL");
    let f_mrlh = Path::new("MRLH");
    let f_mrll = Path::new("MRLL");
    // Placeholder values; the method patches min, max and length (byte offsets 14, 22, 38
    // of a QWord address space descriptor).
    let template_range = AddressSpace::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        0u64,
        0xffff_fffe_u64,
        None,
    );
    let template = ResourceTemplate::new(vec![&template_range]);
    let named = Name::new("MR64".into(), &template);
    let (min_at, max_at, len_at) = (14u8, 22u8, 38u8);
    let create_min = CreateQWordField::new(&f_minl, &f_mr64, &min_at);
    let create_max = CreateQWordField::new(&f_maxl, &f_mr64, &max_at);
    let create_len = CreateQWordField::new(&f_lenl, &f_mr64, &len_at);
    let high = Local(0);
    let thirty_two = 32u8;
    let base_high = ShiftLeft::new(&high, &f_mrbh, &thirty_two);
    let base = Or::new(&f_minl, &high, &f_mrbl);
    let len_high = ShiftLeft::new(&high, &f_mrlh, &thirty_two);
    let len = Or::new(&f_lenl, &high, &f_mrll);
    let end = Local(1);
    let past_end = Add::new(&end, &f_minl, &f_lenl);
    let last = Subtract::new(&f_maxl, &end, &aml::ONE);
    slot_method(
        "MCRS",
        1,
        true,
        &[
            &named,
            &create_min,
            &create_max,
            &create_len,
            &base_high,
            &base,
            &len_high,
            &len,
            &past_end,
            &last,
        ],
        Some(&f_mr64),
    )
}

/// `MPXM(slot)`: the DIMM's proximity domain.
fn proximity_method() -> Owned {
    let f_mpx = Path::new("MPX_");
    let read = Store::new(&Local(0), &f_mpx);
    slot_method("MPXM", 1, false, &[&read], Some(&Local(0)))
}

/// `MOST(slot, event, status, info)`: hands the guest's `_OST` to the VMM.
fn ost_method() -> Owned {
    let f_moev = Path::new("MOEV");
    let f_mosc = Path::new("MOSC");
    let event = Store::new(&f_moev, &Arg(1));
    let status = Store::new(&f_mosc, &Arg(2));
    slot_method("MOST", 4, false, &[&event, &status], None)
}

/// `MEJ0(slot, arg)`: the eject.
fn eject_method() -> Owned {
    let f_mej = Path::new("MEJ_");
    let eject = Store::new(&f_mej, &aml::ONE);
    slot_method("MEJ0", 2, false, &[&eject], None)
}

/// `MPxx`: one PNP0C80 memory device whose methods forward to the container's.
fn slot_device(slot: u32) -> Owned {
    let call = |name: &str, args: Vec<&dyn Aml>| {
        let mut bytes = Vec::new();
        Aml::to_aml_bytes(&MethodCall::new(method_path(name), args), &mut bytes);
        Owned::from_bytes(bytes)
    };
    let crs_call = call("MCRS", vec![&slot]);
    let sta_call = call("MSTA", vec![&slot]);
    let pxm_call = call("MPXM", vec![&slot]);
    let ost_call = call("MOST", vec![&slot, &Arg(0), &Arg(1), &Arg(2)]);
    let ej0_call = call("MEJ0", vec![&slot, &Arg(0)]);
    let crs_ret = Return::new(&crs_call);
    let sta_ret = Return::new(&sta_call);
    let pxm_ret = Return::new(&pxm_call);
    let name = slot_device_name(slot);
    encode(&Device::new(
        Path::new(&name),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C80")),
            &Name::new("_UID".into(), &slot),
            &Method::new("_CRS".into(), 0, false, vec![&crs_ret]),
            &Method::new("_STA".into(), 0, false, vec![&sta_ret]),
            &Method::new("_PXM".into(), 0, false, vec![&pxm_ret]),
            &Method::new("_OST".into(), 3, false, vec![&ost_call]),
            &Method::new("_EJ0".into(), 1, false, vec![&ej0_call]),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_gets_a_memory_device_with_its_methods() {
        let aml = memory_hotplug_aml(3, 0xfeb0_1000).0;
        let text = String::from_utf8_lossy(&aml);
        for needle in [
            "MHPC", "MDNR", "HPMR", "MSCN", "MTFY", "MSTA", "MCRS", "MPXM", "MOST", "MEJ0", "MP00",
            "MP01", "MP02", "_EJ0", "_OST", "_PXM", "_CRS", "_STA",
        ] {
            assert!(text.contains(needle), "AML lacks {needle}");
        }
        assert!(!text.contains("MP03"));
        // PNP0C80 as a compressed EISA id: 0x41d0 0x0c80 -> bytes d0 41 0c 80.
        let eisa = [0x41u8, 0xd0, 0x0c, 0x80];
        assert!(aml.windows(4).any(|w| w == eisa));
        // The register block's address is in the OperationRegion.
        assert!(aml.windows(4).any(|w| w == 0xfeb0_1000u32.to_le_bytes()));
    }

    #[test]
    fn slot_names_are_hex() {
        assert_eq!(slot_device_name(0), "MP00");
        assert_eq!(slot_device_name(255), "MPFF");
        let aml = memory_hotplug_aml(1000, 0).0;
        assert!(String::from_utf8_lossy(&aml).contains("MPFF"));
    }
}

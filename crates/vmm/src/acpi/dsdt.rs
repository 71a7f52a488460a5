//! The DSDT: PCI root with its windows, the ECAM reservation, the Generic Event Device, the
//! power button and the S5 sleep state.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Memory32Fixed, Method, Name, Notify,
    OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, IO,
};
use acpi_tables::Aml;

use crate::arch::x86_64::layout::{
    GuestRange, GED_GSI, GED_MMIO_SIZE, GED_MMIO_START, PCI_CONFIG_PORT, PCI_ECAM_SIZE,
    PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START, SERIAL_GSI, SERIAL_PORT,
};
use crate::devices::ged::event;
use crate::devices::platform::ACPI_S5_SLEEP_TYPE;

/// What the namespace needs to know about the machine.
#[derive(Clone, Debug)]
pub struct DsdtConfig {
    /// The 64-bit PCI BAR window.
    pub pci_mmio64: GuestRange,
    /// ACPI DIMM hotplug: the number of slots and the controller's register address.
    pub memory_hotplug: Option<(u32, u64)>,
}

impl Default for DsdtConfig {
    fn default() -> Self {
        DsdtConfig {
            pci_mmio64: GuestRange {
                start: 1 << 40,
                size: 1 << 36,
            },
            memory_hotplug: None,
        }
    }
}

/// Builds the DSDT.
pub fn build_dsdt(config: &DsdtConfig) -> Vec<u8> {
    let mut dsdt = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 6, *b"TIDEVM", *b"TIDEVMVM", 1);
    let mut body = Vec::new();
    pci_root(config).to_aml_bytes(&mut body);
    motherboard_resources(config).to_aml_bytes(&mut body);
    if let Some((slots, registers)) = config.memory_hotplug {
        super::memory_hotplug::memory_hotplug_aml(slots, registers).to_aml_bytes(&mut body);
    }
    generic_event_device(config.memory_hotplug.is_some()).to_aml_bytes(&mut body);
    power_button().to_aml_bytes(&mut body);
    com1().to_aml_bytes(&mut body);
    s5().to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

/// A sized AML object that owns what it references (acpi_tables builders borrow).
pub(super) struct Owned(pub(super) Vec<u8>);

impl Owned {
    /// Wraps already encoded AML.
    pub(super) fn from_bytes(bytes: Vec<u8>) -> Self {
        Owned(bytes)
    }
}

impl Aml for Owned {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

pub(super) fn encode(object: &dyn Aml) -> Owned {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    Owned(bytes)
}

fn pci_root(config: &DsdtConfig) -> Owned {
    let mmio64_end = config.pci_mmio64.end() - 1;
    let buses = AddressSpace::new_bus_number(0x0u16, 0x0u16);
    let config_ports = IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8);
    let io_low = AddressSpace::new_io(0x0u16, PCI_CONFIG_PORT - 1, None);
    let io_high = AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        config.pci_mmio64.start,
        mmio64_end,
        None,
    );
    let crs = ResourceTemplate::new(vec![
        &buses,
        &config_ports,
        &io_low,
        &io_high,
        &mmio32,
        &mmio64,
    ]);
    encode(&Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &aml::ZERO),
            &Name::new("_SEG".into(), &aml::ZERO),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_BBN".into(), &aml::ZERO),
            &Name::new("_CCA".into(), &aml::ONE),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// Reserves ECAM as a motherboard resource, which Linux requires before it uses MMCONFIG,
/// and the platform registers (the GED's, the memory hotplug controller's).
fn motherboard_resources(config: &DsdtConfig) -> Owned {
    let ecam = Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let ged = Memory32Fixed::new(true, GED_MMIO_START as u32, GED_MMIO_SIZE as u32);
    let memory_hotplug = config.memory_hotplug.map(|(_, registers)| {
        Memory32Fixed::new(
            true,
            registers as u32,
            crate::devices::memory_hotplug::MEMORY_HOTPLUG_REGISTERS_SIZE as u32,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&ecam, &ged];
    if let Some(registers) = &memory_hotplug {
        resources.push(registers);
    }
    let crs = ResourceTemplate::new(resources);
    encode(&Device::new(
        "_SB_.MBRD".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// ACPI0013 with an `_EVT` that reads the event register and dispatches on its bits: the
/// power button, and with DIMM slots the memory hotplug scan.
fn generic_event_device(memory_hotplug: bool) -> Owned {
    // Interrupts only: Linux's GED driver treats every _CRS entry as an interrupt and fails
    // its probe on anything else (leaving a handler behind that oopses on the first event).
    // The event register is reserved by the motherboard device instead.
    let interrupt = Interrupt::new(true, true, false, false, GED_GSI);
    let crs = ResourceTemplate::new(vec![&interrupt]);
    let region = OpRegion::new(
        "GDST".into(),
        OpRegionSpace::SystemMemory,
        &(GED_MMIO_START as usize),
        &1usize,
    );
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    );
    let pending = aml::Local(0);
    let gdat = Path::new("GDAT");
    let read_pending = aml::Store::new(&pending, &gdat);
    let power_bit = aml::And::new(&aml::ZERO, &pending, &event::POWER_BUTTON);
    let power_button = Path::new("\\_SB_.PWRB");
    let power_notify = Notify::new(&power_button, &0x80u8);
    let on_power = If::new(&power_bit, vec![&power_notify]);
    let memory_bit = aml::And::new(&aml::ZERO, &pending, &event::MEMORY_HOTPLUG);
    let scan = aml::MethodCall::new(
        Path::new(&format!("{}.MSCN", super::memory_hotplug::CONTAINER)),
        vec![],
    );
    let on_memory = If::new(&memory_bit, vec![&scan]);
    let mut body: Vec<&dyn Aml> = vec![&read_pending, &on_power];
    if memory_hotplug {
        body.push(&on_memory);
    }
    let evt = Method::new("_EVT".into(), 1, true, body);
    encode(&Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    ))
}

fn power_button() -> Owned {
    encode(&Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &aml::ZERO),
        ],
    ))
}

/// COM1 as a PNP device. On a hardware-reduced ACPI platform Linux sets up no legacy ISA
/// IRQs, so the UART's interrupt only works when ACPI describes it (the PNP 8250 driver then
/// maps GSI 4 and takes over the legacy port).
fn com1() -> Owned {
    let interrupt = Interrupt::new(true, true, false, false, SERIAL_GSI);
    let ports = IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let crs = ResourceTemplate::new(vec![&interrupt, &ports]);
    encode(&Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// `_S5_`: the sleep type Linux writes to the sleep control register to power off.
fn s5() -> Owned {
    encode(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&ACPI_S5_SLEEP_TYPE, &ACPI_S5_SLEEP_TYPE]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsdt_names_the_devices_linux_looks_for() {
        let dsdt = build_dsdt(&DsdtConfig::default());
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(dsdt[4..8].try_into().unwrap()) as usize,
            dsdt.len()
        );
        let text = String::from_utf8_lossy(&dsdt);
        for needle in [
            "PCI0", "MBRD", "GED_", "ACPI0013", "PWRB", "COM1", "_S5_", "_EVT",
        ] {
            assert!(text.contains(needle), "DSDT lacks {needle}");
        }
        assert_eq!(dsdt.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }
}

#[cfg(test)]
mod dump {
    /// `TIDEVM_DUMP_DSDT=path cargo test -p tidevm-vmm dump_dsdt` writes a DSDT with DIMM
    /// slots for `iasl -d`.
    #[test]
    fn dump_dsdt() {
        if let Some(path) = std::env::var_os("TIDEVM_DUMP_DSDT") {
            let config = super::DsdtConfig {
                memory_hotplug: Some((2, 0xfeb0_1000)),
                ..super::DsdtConfig::default()
            };
            std::fs::write(path, super::build_dsdt(&config)).unwrap();
        }
    }
}

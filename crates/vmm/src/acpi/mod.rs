//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG, DSDT, and with NUMA nodes or
//! DIMM slots the SRAT and SLIT.
//!
//! They are written into the legacy BIOS area, which Linux keeps reserved, and the RSDP's
//! address goes to the kernel through PVH's `rsdp_paddr`.

mod dsdt;
mod memory_hotplug;
pub mod numa;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use zerocopy::IntoBytes;

use crate::arch::x86_64::layout::{
    ACPI_PM_PORT, ACPI_TABLES_END, ACPI_TABLES_START, IOAPIC_START, LAPIC_START, PCI_ECAM_START,
};
use crate::devices::platform::{ACPI_RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET};
pub use dsdt::DsdtConfig;

const OEM_ID: [u8; 6] = *b"TIDEVM";
const OEM_TABLE_ID: [u8; 8] = *b"TIDEVMVM";
const OEM_REVISION: u32 = 1;
/// FADT `hypervisor_vendor_identity`.
const HYPERVISOR_VENDOR: u64 = u64::from_le_bytes(*b"TIDEVM\0\0");

/// Errors while writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in their area.
    #[error("ACPI tables need {0} bytes, more than the reserved area")]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write ACPI tables into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC IDs 0..n).
    pub cpus: u8,
    /// Namespace contents.
    pub dsdt: DsdtConfig,
    /// NUMA nodes (empty: no SRAT/SLIT, one implicit node).
    pub numa: Vec<numa::NumaNode>,
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Writes every table and returns the RSDP's guest-physical address.
pub fn write_acpi_tables<M: GuestMemory>(mem: &M, config: &AcpiConfig) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_TABLES_START.0;
    // Tables follow the RSDP, each 8-byte aligned.
    let mut next = rsdp_addr + 64;
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        let end = at + bytes.len() as u64;
        if end > ACPI_TABLES_END {
            return Err(AcpiError::TooLarge(end - ACPI_TABLES_START.0));
        }
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(AcpiError::GuestMemory)?;
        next = (end + 7) & !7;
        Ok(at)
    };

    let dsdt = place(&dsdt::build_dsdt(&config.dsdt))?;
    let fadt = place(&aml_bytes(&build_fadt(dsdt)))?;
    let madt = place(&build_madt(config.cpus))?;
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    let mcfg = place(&aml_bytes(&mcfg))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in [fadt, madt, mcfg] {
        xsdt.add_entry(table);
    }
    if !config.numa.is_empty() {
        xsdt.add_entry(place(&numa::build_srat(
            &config.numa,
            OEM_ID,
            OEM_TABLE_ID,
        ))?);
        xsdt.add_entry(place(&numa::build_slit(
            config.numa.len(),
            OEM_ID,
            OEM_TABLE_ID,
        ))?);
    }
    let xsdt = place(&aml_bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt);
    mem.write_slice(rsdp.as_bytes(), GuestAddress(rsdp_addr))
        .map_err(AcpiError::GuestMemory)?;
    Ok(rsdp_addr)
}

fn io_register(port: u16, offset: u64) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port) + offset,
    )
}

/// A hardware-reduced FADT: no PM1 blocks or SCI, just the sleep and reset registers.
fn build_fadt(dsdt: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io_register(ACPI_PM_PORT, SLEEP_CONTROL_OFFSET);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register(ACPI_PM_PORT, SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = io_register(ACPI_PM_PORT, SLEEP_STATUS_OFFSET);
    // IA-PC boot flags: no VGA, no CMOS RTC (we emulate neither).
    fadt.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    fadt.hypervisor_vendor_identity = HYPERVISOR_VENDOR.into();
    fadt.finalize()
}

/// MADT: one local APIC per vCPU, the IOAPIC, and ISA IRQ overrides. KVM's default routing
/// sends GSI n to IOAPIC pin n, so no override is needed for the timer.
fn build_madt(cpus: u8) -> Vec<u8> {
    const MADT_PCAT_COMPAT: u32 = 1;
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..cpus {
        // Processor Local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
        madt.append_slice(&[0, 8, cpu, cpu, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, ID 0, reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    madt.update_checksum();
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let config = AcpiConfig {
            cpus: 2,
            dsdt: DsdtConfig::default(),
            numa: Vec::new(),
        };
        let rsdp = write_acpi_tables(&mem, &config).unwrap();
        let mut rsdp_bytes = [0u8; 36];
        mem.read_slice(&mut rsdp_bytes, GuestAddress(rsdp)).unwrap();
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp_bytes[..20]));
        assert!(checksum_ok(&rsdp_bytes));
        let xsdt_addr = u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap());
        let xsdt = read_table(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut signatures = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let table = read_table(&mem, u64::from_le_bytes(entry.try_into().unwrap()));
            assert!(checksum_ok(&table), "{:?}", &table[..4]);
            signatures.push(String::from_utf8_lossy(&table[..4]).to_string());
            if &table[..4] == b"FACP" {
                let dsdt = u64::from_le_bytes(table[140..148].try_into().unwrap());
                let dsdt = read_table(&mem, dsdt);
                assert_eq!(&dsdt[..4], b"DSDT");
                assert!(checksum_ok(&dsdt));
                // HW_REDUCED_ACPI and RESET_REG_SUP.
                let flags = u32::from_le_bytes(table[112..116].try_into().unwrap());
                assert_ne!(flags & (1 << 20), 0);
                assert_ne!(flags & (1 << 10), 0);
            }
            if &table[..4] == b"APIC" {
                // Two 8-byte LAPIC entries and one 12-byte IOAPIC entry.
                assert_eq!(table.len(), 44 + 2 * 8 + 12);
            }
        }
        assert_eq!(signatures, ["FACP", "APIC", "MCFG"]);
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut bytes = vec![0u8; len as usize];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }
}

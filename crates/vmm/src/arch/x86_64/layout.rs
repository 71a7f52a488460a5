//! The guest-physical address map of a tidevm VM, laid out like a PC.
//!
//! ```text
//! 0x0000_0000  boot structures (GDT, PVH start_info, memmap, cmdline)   RAM
//! 0x000A_0000  ACPI tables (RSDP first), not listed as RAM              RAM backing
//! 0x0010_0000  kernel, initramfs, the rest of low RAM                   RAM
//! 0xC000_0000  32-bit MMIO hole: PCI BARs, ECAM, platform devices, APICs
//! 0x1_0000_0000  RAM that did not fit below the hole
//! top of RAM, 1 GiB aligned: hotplug area (virtio-mem regions, DIMMs)
//! after the hotplug area: 64-bit PCI MMIO window
//! ```

use vm_memory::GuestAddress;

/// GDT used at PVH entry (the kernel replaces it almost at once).
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH module list (one entry: the initramfs), right after start_info.
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
/// PVH memory map.
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x7000);
/// Most memory map entries the PVH area can hold before reaching the cmdline.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 128;
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Largest command line we accept (the Debian kernel's own limit is 2047 bytes).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the conventional memory that the memory map lists as RAM.
pub const LOW_RAM_LEGACY_END: u64 = 0xA_0000;
/// ACPI tables live in the legacy BIOS area, which Linux treats as reserved.
pub const ACPI_TABLES_START: GuestAddress = GuestAddress(0xA_0000);
/// End of the area reserved for ACPI tables.
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// The real-mode reset vector (F000:FFF0), where `machine_real_restart` jumps.
pub const RESET_VECTOR: GuestAddress = GuestAddress(0xF_FFF0);
/// Start of "high" (above 1 MiB) memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM stops here and continues at 4 GiB.
pub const MMIO32_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO32_HOLE_END: u64 = 1 << 32;
/// PCI 32-bit BAR window (inside the hole).
pub const PCI_MMIO32_START: u64 = 0xC000_0000;
/// Size of the PCI 32-bit BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM), bus 0 only.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
/// ECAM size for one bus: 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The Generic Event Device's event register (one byte, read-to-clear).
pub const GED_MMIO_START: u64 = 0xFEB0_0000;
/// Size of the GED register window.
pub const GED_MMIO_SIZE: u64 = 0x1000;
/// Reserved for future platform devices (memory hotplug controller, ...).
pub const PLATFORM_MMIO_START: u64 = 0xFEB0_1000;
/// IOAPIC MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Where KVM (VMX) wants its TSS: three pages, just below the identity map page.
pub const KVM_TSS_ADDRESS: u64 = 0xFFFB_D000;
/// KVM (VMX) identity-map page for real mode emulation.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xFFFB_C000;

/// RAM above the hole starts at 4 GiB.
pub const RAM_64BIT_START: u64 = 1 << 32;
/// The hotplug area starts at a 1 GiB boundary (a multiple of Linux's 128 MiB memory block and
/// of a gigantic page).
pub const HOTPLUG_AREA_ALIGN: u64 = 1 << 30;
/// Size of the hotplug area kept free after the top of boot RAM.
pub const HOTPLUG_AREA_SIZE: u64 = 512 << 30;
/// Size of the 64-bit PCI BAR window after the hotplug area.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// GSI of the 16550 UART on 0x3f8 (ISA IRQ 4).
pub const SERIAL_GSI: u32 = 4;
/// GSI of the ACPI Generic Event Device.
pub const GED_GSI: u32 = 5;
/// First GSI free for MSI routes (IOAPIC pins are 0..24).
pub const FIRST_MSI_GSI: u32 = 24;

/// I/O port of the COM1 UART.
pub const SERIAL_PORT: u16 = 0x3f8;
/// I/O port of the ACPI sleep control/status and reset registers (hardware-reduced ACPI).
pub const ACPI_PM_PORT: u16 = 0x600;
/// I/O port range of PCI configuration mechanism #1.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;

/// A guest physical range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

impl GuestRange {
    /// One past the last byte. A range that would run past the top of the address space (only
    /// a guest-named one can) ends at `u64::MAX` instead of wrapping to a small address, so it
    /// never looks like a valid low range; validation refuses it.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }
}

/// Where everything of one VM lives, derived from its boot memory size alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    /// Boot RAM ranges: below the hole, then above 4 GiB if needed.
    pub ram: Vec<GuestRange>,
    /// Free guest-physical space for virtio-mem regions and DIMMs.
    pub hotplug_area: GuestRange,
    /// 64-bit PCI BAR window.
    pub pci_mmio64: GuestRange,
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub const fn align_up(value: u64, align: u64) -> u64 {
    (value + align - 1) & !(align - 1)
}

impl GuestLayout {
    /// Lays out `boot_ram` bytes of RAM.
    pub fn new(boot_ram: u64) -> Self {
        let low = boot_ram.min(MMIO32_HOLE_START);
        let mut ram = vec![GuestRange {
            start: 0,
            size: low,
        }];
        if boot_ram > low {
            ram.push(GuestRange {
                start: RAM_64BIT_START,
                size: boot_ram - low,
            });
        }
        let top = ram.last().map_or(0, GuestRange::end).max(RAM_64BIT_START);
        let hotplug_area = GuestRange {
            start: align_up(top, HOTPLUG_AREA_ALIGN),
            size: HOTPLUG_AREA_SIZE,
        };
        let pci_mmio64 = GuestRange {
            start: hotplug_area.end(),
            size: PCI_MMIO64_SIZE,
        };
        GuestLayout {
            ram,
            hotplug_area,
            pci_mmio64,
        }
    }

    /// Highest guest-physical address the VM uses, plus one.
    pub fn end(&self) -> u64 {
        self.pci_mmio64.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_fits_below_the_hole() {
        let layout = GuestLayout::new(512 << 20);
        assert_eq!(
            layout.ram,
            vec![GuestRange {
                start: 0,
                size: 512 << 20
            }]
        );
        assert_eq!(layout.hotplug_area.start, 4 << 30);
    }

    #[test]
    fn large_vm_crosses_the_hole() {
        let layout = GuestLayout::new(6 << 30);
        assert_eq!(layout.ram.len(), 2);
        assert_eq!(layout.ram[0].end(), MMIO32_HOLE_START);
        assert_eq!(layout.ram[1].start, 4 << 30);
        assert_eq!(layout.ram[1].size, 3 << 30);
        assert_eq!(layout.hotplug_area.start, 7 << 30);
        assert_eq!(layout.hotplug_area.start % (128 << 20), 0);
        assert!(layout.pci_mmio64.start >= layout.hotplug_area.end());
    }

    #[test]
    fn unaligned_top_is_rounded_to_the_next_gib() {
        let layout = GuestLayout::new((3 << 30) + (100 << 20));
        assert_eq!(layout.hotplug_area.start, 5 << 30);
    }
}

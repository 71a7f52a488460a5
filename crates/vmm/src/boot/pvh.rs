//! PVH boot of an uncompressed ELF `vmlinux`: the kernel starts in 32-bit protected mode at the
//! entry point named by its `XEN_ELFNOTE_PHYS32_ENTRY` note, with `%ebx` pointing at an
//! `hvm_start_info` that carries the memory map, the command line, the initramfs and the RSDP.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::x86_64::layout::{
    GuestRange, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, LOW_RAM_LEGACY_END, PCI_ECAM_SIZE,
    PCI_ECAM_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the kernel and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The path given.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a loadable ELF image.
    #[error("kernel {path} is not a loadable x86-64 ELF vmlinux ({reason}); pass the uncompressed vmlinux, not a bzImage")]
    NotElf {
        /// The path given.
        path: String,
        /// What the loader said.
        reason: String,
    },
    /// The ELF has no PVH entry note.
    #[error("kernel {0} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); it needs CONFIG_PVH=y")]
    NoPvhEntry(String),
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    ReadInitramfs {
        /// The path given.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit in low RAM above the kernel.
    #[error("initramfs of {size} bytes does not fit in guest RAM below 3 GiB above the kernel")]
    InitramfsTooLarge {
        /// Size of the initramfs.
        size: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    /// Too many memory map entries.
    #[error("too many memory map entries ({0})")]
    MemmapTooLarge(usize),
    /// Writing boot data into guest memory failed.
    #[error("cannot write boot data into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// What the vCPU needs to start the kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// 32-bit PVH entry point.
    pub entry: u64,
    /// Where `hvm_start_info` was written (goes in `%ebx`).
    pub start_info: u64,
}

/// Loads `kernel` (and `initramfs`) into `mem` and writes the PVH boot structures.
///
/// `ram` is the boot RAM map; `rsdp` the address of the ACPI RSDP.
pub fn load_pvh_kernel(
    mem: &GuestMemoryMmap,
    ram: &[GuestRange],
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootInfo, BootError> {
    let path = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: path.clone(),
        source,
    })?;
    let loaded =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))).map_err(|e| {
            BootError::NotElf {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
        _ => return Err(BootError::NoPvhEntry(path)),
    };

    let module = match initramfs {
        Some(path) => Some(load_initramfs(mem, path, loaded.kernel_end)?),
        None => None,
    };
    write_cmdline(mem, cmdline)?;
    let memmap = boot_memory_map(ram);
    write_start_info(mem, &memmap, module, rsdp)?;
    Ok(BootInfo {
        entry,
        start_info: PVH_INFO_START.raw_value(),
    })
}

/// The memory map the guest boots with: only boot RAM (hotplug areas must not appear, or
/// hot-add would collide with "boot memory"), plus the ECAM window as reserved.
pub fn boot_memory_map(ram: &[GuestRange]) -> Vec<hvm_memmap_table_entry> {
    let mut map = Vec::new();
    let entry = |addr, size, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    for range in ram {
        if range.start == 0 {
            map.push(entry(0, LOW_RAM_LEGACY_END.min(range.size), E820_RAM));
            if range.end() > HIGH_RAM_START {
                map.push(entry(
                    HIGH_RAM_START,
                    range.end() - HIGH_RAM_START,
                    E820_RAM,
                ));
            }
        } else {
            map.push(entry(range.start, range.size, E820_RAM));
        }
    }
    map.push(entry(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    map.sort_by_key(|e| e.addr);
    map
}

/// Places the initramfs page-aligned at the top of low RAM, read straight from the file
/// into guest memory (no intermediate buffer: in the nested lane every byte copied costs).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let read_error = |source| BootError::ReadInitramfs {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    let low_ram_end = mem.find_region(GuestAddress(0)).map_or(0, |r| r.len());
    let start = low_ram_end
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::InitramfsTooLarge { size })?;
    // `size` fits in usize: the initramfs lies inside low RAM (checked above).
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(BootError::GuestMemory)?;
    Ok((start, size))
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let bytes = cmdline.as_bytes();
    if bytes.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(bytes.len()));
    }
    let mut with_nul = bytes.to_vec();
    with_nul.push(0);
    mem.write_slice(&with_nul, CMDLINE_START)
        .map_err(BootError::GuestMemory)
}

fn write_start_info(
    mem: &GuestMemoryMmap,
    memmap: &[hvm_memmap_table_entry],
    module: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    if memmap.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::MemmapTooLarge(memmap.len()));
    }
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.raw_value(),
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START.raw_value(),
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = module {
        let entry = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(entry, PVH_MODLIST_START)
            .map_err(BootError::GuestMemory)?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START.raw_value();
    }
    for (i, entry) in memmap.iter().enumerate() {
        let addr = PVH_MEMMAP_START.unchecked_add(i as u64 * 24);
        mem.write_obj(*entry, addr)
            .map_err(BootError::GuestMemory)?;
    }
    mem.write_obj(start_info, PVH_INFO_START)
        .map_err(BootError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::GuestLayout;

    #[test]
    fn memory_map_lists_boot_ram_and_reserves_ecam() {
        let layout = GuestLayout::new(6 << 30);
        let map = boot_memory_map(&layout.ram);
        let summary: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.type_)).collect();
        assert_eq!(
            summary,
            vec![
                (0, 0xA0000, E820_RAM),
                (0x10_0000, 0xC000_0000 - 0x10_0000, E820_RAM),
                (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
                (4 << 30, 3 << 30, E820_RAM),
            ]
        );
        // The hotplug area is never listed.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= layout.hotplug_area.start));
    }

    #[test]
    fn non_elf_kernel_is_rejected_with_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("tidevm-pvh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bogus = dir.join("bzImage");
        std::fs::write(&bogus, b"MZ this is not an ELF file at all").unwrap();
        let layout = GuestLayout::new(64 << 20);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let err = load_pvh_kernel(&mem, &layout.ram, &bogus, None, "", 0).unwrap_err();
        assert!(matches!(err, BootError::NotElf { .. }), "{err}");
        let missing = load_pvh_kernel(&mem, &layout.ram, &dir.join("nope"), None, "", 0);
        assert!(matches!(missing, Err(BootError::OpenKernel { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram_page_aligned() {
        let dir = std::env::temp_dir().join(format!("tidevm-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![0x5a; 10_000]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let (start, size) = load_initramfs(&mem, &initrd, 16 << 20).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(start % PAGE_SIZE, 0);
        assert!(start + size <= 64 << 20);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(start)).unwrap(), 0x5a);
        assert!(matches!(
            load_initramfs(&mem, &initrd, 64 << 20),
            Err(BootError::InitramfsTooLarge { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

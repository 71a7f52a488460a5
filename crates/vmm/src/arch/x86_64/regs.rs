//! The vCPU state at the PVH entry point: 32-bit protected mode, paging off.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestMemory};

use super::layout::{BOOT_GDT_START, RESET_VECTOR};

/// Errors while setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("cannot set vCPU {what}")]
    Kvm {
        /// Which register group.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the boot GDT or reset stub failed.
    #[error("cannot write boot code into guest memory")]
    Gdt(#[source] vm_memory::GuestMemoryError),
}

const GDT_CODE_SELECTOR: u16 = 0x10;
const GDT_DATA_SELECTOR: u16 = 0x18;
const GDT_TSS_SELECTOR: u16 = 0x20;
/// null, null, 32-bit code (0x10), 32-bit data (0x18), TSS (0x20): the layout Linux's own boot
/// GDT uses, so the selectors stay valid until it loads its own.
const BOOT_GDT: [u64; 5] = [
    0,
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back: without it Linux maps all RAM uncached.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
/// Fast string operations enabled.
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// LAPIC register offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// Writes the boot GDT into guest memory (once per boot).
pub fn write_boot_gdt<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, BOOT_GDT_START.unchecked_add(i as u64 * 8))
            .map_err(RegsError::Gdt)?;
    }
    Ok(())
}

/// Real-mode code at the reset vector: `mov al, 0xfe; out 0x64, al; hlt`.
///
/// A hardware-reduced ACPI guest without EFI reboots by default through "EFI" (absent) and
/// then a jump to the BIOS reset vector in real mode. There is no BIOS, so this stub pulses
/// the i8042 reset line instead, which the VMM turns into a reset.
const RESET_STUB: [u8; 5] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];

/// Writes the reset-vector stub (once per boot).
pub fn write_reset_stub<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    mem.write_slice(&RESET_STUB, RESET_VECTOR)
        .map_err(RegsError::Gdt)
}

fn segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU at the PVH entry point with `%ebx` pointing at `hvm_start_info`.
pub fn setup_pvh_boot_vcpu(vcpu: &VcpuFd, entry: u64, start_info: u64) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("sregs"))?;
    let code = segment(GDT_CODE_SELECTOR, 0xb);
    let data = segment(GDT_DATA_SELECTOR, 0x3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        selector: GDT_TSS_SELECTOR,
        s: 0,
        db: 0,
        g: 0,
        ..code
    };
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // Protected mode, paging off, as the PVH ABI asks; ET is hard-wired on modern CPUs.
    sregs.cr0 = 0x11;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("sregs"))?;

    let regs = kvm_regs {
        rip: entry,
        rbx: start_info,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("regs"))
}

/// FPU, MSRs and local APIC setup common to every vCPU.
pub fn setup_vcpu_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("FPU"))?;

    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WRITEBACK,
            ..Default::default()
        },
    ])
    .expect("two MSR entries fit in a KVM MSR list");
    vcpu.set_msrs(&msrs).map_err(kvm_err("MSRs"))?;

    // LINT0 delivers the 8259's ExtINT and LINT1 NMIs, as on a PC after firmware.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("LAPIC"))?;
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm_err("LAPIC"))
}

fn set_lvt_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_is_written_in_bits_8_to_10() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 1] = 0x01; // fixed mode 1 (lowest priority) before
        set_lvt_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
    }
}

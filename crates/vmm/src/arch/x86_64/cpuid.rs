//! CPUID for a vCPU: what KVM supports, with the topology and hypervisor bits filled in.

use kvm_bindings::CpuId;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT ("logical processor count in EBX is valid").
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Adjusts KVM's supported CPUID for vCPU `cpu_index` of `cpu_count`.
///
/// Linux takes the APIC ID from leaf 1 EBX[31:24] and the x2APIC ID from leaves 0xB/0x1F EDX;
/// they must match the MADT, or secondary CPUs never come up. We present one socket with one
/// thread per core, which is the same on Intel and AMD hosts.
pub fn configure_vcpu_cpuid(cpuid: &mut CpuId, cpu_index: u8, cpu_count: u8) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            1 => {
                entry.ebx = (u32::from(cpu_index) << 24)
                    | (u32::from(cpu_count) << 16)
                    | (8 << 8)
                    | (entry.ebx & 0xff);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if cpu_count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                }
            }
            // Intel deterministic cache parameters: cores per package in EAX[31:26].
            4 => {
                entry.eax &= !(0x3f << 26);
                entry.eax |= u32::from(cpu_count.saturating_sub(1)) << 26;
                entry.eax &= !(0xfff << 14);
            }
            // Extended topology: level 0 = SMT (1 thread), level 1 = core (cpu_count cores).
            0xb | 0x1f => {
                entry.edx = u32::from(cpu_index);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = bits_for(cpu_count);
                        entry.ebx = u32::from(cpu_count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            // AMD: number of cores in ECX[7:0] and the APIC ID size.
            0x8000_0008 => {
                entry.ecx = (bits_for(cpu_count) << 12) | u32::from(cpu_count.saturating_sub(1));
            }
            // AMD extended APIC ID / compute unit: one thread per core.
            0x8000_001e => {
                entry.eax = u32::from(cpu_index);
                entry.ebx = u32::from(cpu_index);
                entry.ecx = 0;
            }
            _ => {}
        }
    }
}

/// Number of APIC-ID bits needed to number `count` CPUs.
fn bits_for(count: u8) -> u32 {
    let count = u32::from(count.max(1));
    32 - (count - 1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid_with(entries: &[(u32, u32)]) -> CpuId {
        let entries: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|&(function, index)| kvm_cpuid_entry2 {
                function,
                index,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_ids_follow_the_cpu_index() {
        let mut cpuid = cpuid_with(&[(1, 0), (0xb, 0), (0xb, 1)]);
        configure_vcpu_cpuid(&mut cpuid, 1, 2);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 1);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(e[1].edx, 1);
        assert_eq!(e[2].ebx, 2);
        assert_eq!(e[2].eax, 1);
    }

    #[test]
    fn apic_id_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(8), 3);
    }
}

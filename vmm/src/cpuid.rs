//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC id filled in and
//! the hypervisor bit set.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_CPU_COUNT_SHIFT: u32 = 16;
const EDX_HTT_BIT: u32 = 1 << 28;
const ECX_CX16_BIT: u32 = 1 << 13;

/// Adjusts `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`.
///
/// `ring0_quirks` hides features a kernel running its own code in ring 0
/// cannot use under the nested hypervisor here (PVM), whose instruction
/// emulator runs all ring-0 code and cannot execute them ("KVM internal
/// error", emulation failure): CMPXCHG16B, which Linux's SLUB allocator
/// uses right after the "Memory:" line; Linux has a lock-based fallback.
/// (XSAVE would need hiding too, for Linux's FPU init, but PVM forces the
/// XSAVE bit back whatever KVM_SET_CPUID2 says.) Hardware KVM needs none
/// of this.
pub fn configure(cpuid: &mut CpuId, index: u8, count: u8, ring0_quirks: bool) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // APIC id in EBX[31:24], logical processor count in EBX[23:16].
                entry.ebx &= 0x0000_ffff;
                entry.ebx |= u32::from(index) << EBX_APIC_ID_SHIFT;
                entry.ebx |= u32::from(count) << EBX_CPU_COUNT_SHIFT;
                if count > 1 {
                    entry.edx |= EDX_HTT_BIT;
                }
                entry.ecx |= ECX_HYPERVISOR_BIT;
                if ring0_quirks {
                    entry.ecx &= !ECX_CX16_BIT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                // x2APIC id of this logical processor, for every sub-leaf.
                entry.edx = u32::from(index);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure(&mut cpuid, 3, 4, false);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR_BIT, 0);
        assert_eq!(e[1].edx, 3);
    }

    #[test]
    fn ring0_quirks_hide_cx16() {
        let entries = [kvm_cpuid_entry2 {
            function: 1,
            ecx: ECX_CX16_BIT,
            ..Default::default()
        }];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure(&mut cpuid, 0, 1, false);
        assert_ne!(cpuid.as_slice()[0].ecx & ECX_CX16_BIT, 0);
        configure(&mut cpuid, 0, 1, true);
        assert_eq!(cpuid.as_slice()[0].ecx & ECX_CX16_BIT, 0);
    }
}

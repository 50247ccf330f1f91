//! Boot GDT entries and their KVM segment form (the same encoding the CPU
//! reads, so the segment registers match what is in guest memory).

use kvm_bindings::kvm_segment;

/// Packs a GDT descriptor from flags (access byte in bits 0..8, flags
/// nibble in bits 12..16), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// 64-bit code, 32-bit code, flat data, and a TSS placeholder.
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// The GDT for the 64-bit Linux entry: null, code64, data, tss.
pub const LINUX_GDT: [u64; 4] = [0, CODE64, DATA, TSS];
/// The GDT for the 32-bit PVH entry: null, code32, data, tss.
pub const PVH_GDT: [u64; 4] = [0, CODE32, DATA, TSS];

/// The KVM segment for GDT entry `entry` at index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_known_values() {
        assert_eq!(CODE64, 0x00af_9b00_0000_ffff);
        assert_eq!(CODE32, 0x00cf_9b00_0000_ffff);
        assert_eq!(DATA, 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn segments_decode() {
        let cs = segment_from_gdt(CODE64, 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.s, cs.present),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(DATA, 2);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.base), (16, 3, 1, 0));
        let cs32 = segment_from_gdt(CODE32, 1);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let tss = segment_from_gdt(TSS, 3);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}

//! Register dumps for guest crashes: an exception reported by the guest's
//! ring-0 stubs (an `abi::ExceptionFrame`), or a triple fault / KVM error.

use std::fmt::Write;

use kvm_bindings::{kvm_regs, kvm_sregs};
use snapvm_guest::abi::ExceptionFrame;

/// Mnemonic of an x86 exception vector.
pub fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range exceeded",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack-segment fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating-point",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating-point",
        20 => "#VE virtualization",
        21 => "#CP control protection",
        _ => "unknown vector",
    }
}

/// The dump printed when the guest reports an exception.
pub fn format_exception(vcpu: usize, f: &ExceptionFrame, sregs: Option<&kvm_sregs>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "snapvm: guest exception on vCPU {vcpu}: vector {} ({}), error code {:#x}",
        f.vector,
        vector_name(f.vector),
        f.error_code
    );
    let _ = writeln!(
        s,
        "  RIP {:#018x}  CS {:#06x}  RFLAGS {:#010x}",
        f.rip, f.cs, f.rflags
    );
    let _ = writeln!(s, "  RSP {:#018x}  SS {:#06x}", f.rsp, f.ss);
    let gprs = [
        ("RAX", f.rax),
        ("RBX", f.rbx),
        ("RCX", f.rcx),
        ("RDX", f.rdx),
        ("RSI", f.rsi),
        ("RDI", f.rdi),
        ("RBP", f.rbp),
        ("R8 ", f.r8),
        ("R9 ", f.r9),
        ("R10", f.r10),
        ("R11", f.r11),
        ("R12", f.r12),
        ("R13", f.r13),
        ("R14", f.r14),
        ("R15", f.r15),
    ];
    write_gprs(&mut s, &gprs);
    if let Some(sr) = sregs {
        let _ = writeln!(s, "  CR2 {:#018x}  CR3 {:#018x}", sr.cr2, sr.cr3);
    }
    s
}

/// The dump printed for a triple fault or a KVM error, from live registers.
pub fn format_cpu_state(
    vcpu: usize,
    reason: &str,
    regs: Option<&kvm_regs>,
    sregs: Option<&kvm_sregs>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "snapvm: vCPU {vcpu}: {reason}");
    if let Some(r) = regs {
        let _ = writeln!(
            s,
            "  RIP {:#018x}  RFLAGS {:#010x}  RSP {:#018x}",
            r.rip, r.rflags, r.rsp
        );
        let gprs = [
            ("RAX", r.rax),
            ("RBX", r.rbx),
            ("RCX", r.rcx),
            ("RDX", r.rdx),
            ("RSI", r.rsi),
            ("RDI", r.rdi),
            ("RBP", r.rbp),
            ("R8 ", r.r8),
            ("R9 ", r.r9),
            ("R10", r.r10),
            ("R11", r.r11),
            ("R12", r.r12),
            ("R13", r.r13),
            ("R14", r.r14),
            ("R15", r.r15),
        ];
        write_gprs(&mut s, &gprs);
    }
    if let Some(sr) = sregs {
        let _ = writeln!(
            s,
            "  CS {:#06x}  SS {:#06x}  CR0 {:#x}  CR2 {:#x}  CR3 {:#x}  CR4 {:#x}  EFER {:#x}",
            sr.cs.selector, sr.ss.selector, sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer
        );
    }
    s
}

fn write_gprs(s: &mut String, gprs: &[(&str, u64)]) {
    for row in gprs.chunks(3) {
        let line: Vec<String> = row.iter().map(|(n, v)| format!("{n} {v:#018x}")).collect();
        let _ = writeln!(s, "  {}", line.join("  "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_dump_names_everything() {
        let f = ExceptionFrame {
            vector: 14,
            error_code: 2,
            rip: 0x20_1234,
            cs: 0x2b,
            rflags: 0x246,
            rsp: 0x7fff_f000,
            ss: 0x23,
            rax: 0xaaaa,
            r15: 0xf15,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cr2: 0xdead_0000,
            cr3: 0x1000,
            ..Default::default()
        };
        let d = format_exception(1, &f, Some(&sregs));
        assert!(
            d.contains("vCPU 1: vector 14 (#PF page fault), error code 0x2"),
            "{d}"
        );
        assert!(d.contains("RIP 0x0000000000201234"), "{d}");
        assert!(d.contains("CS 0x002b"), "{d}");
        assert!(d.contains("RFLAGS 0x00000246"), "{d}");
        assert!(d.contains("RAX 0x000000000000aaaa"), "{d}");
        assert!(d.contains("R15 0x0000000000000f15"), "{d}");
        assert!(d.contains("CR2 0x00000000dead0000"), "{d}");
        assert!(d.contains("CR3 0x0000000000001000"), "{d}");
        for reg in [
            "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "R8 ", "R9 ", "R10", "R11", "R12", "R13",
            "R14", "RSP", "SS",
        ] {
            assert!(d.contains(reg), "{reg} missing in {d}");
        }
    }

    #[test]
    fn vector_names() {
        assert_eq!(vector_name(13), "#GP general protection");
        assert_eq!(vector_name(6), "#UD invalid opcode");
        assert_eq!(vector_name(99), "unknown vector");
    }

    #[test]
    fn cpu_state_dump() {
        let regs = kvm_regs {
            rip: 0xfff0,
            ..Default::default()
        };
        let d = format_cpu_state(0, "triple fault", Some(&regs), None);
        assert!(d.contains("vCPU 0: triple fault"));
        assert!(d.contains("RIP 0x000000000000fff0"));
    }
}

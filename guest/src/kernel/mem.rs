//! memcpy/memmove/memset/memcmp/bcmp, which the compiler emits calls to and
//! which no libc provides here.
//!
//! Each is one string instruction in inline assembly: the compiler cannot
//! see a loop it would "optimise" back into a call to the function itself.
//! The ABI guarantees DF = 0 on entry (and the boot stub clears it).

use core::arch::asm;

/// # Safety
/// `dest` and `src` valid for `n` bytes, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        )
    };
    dest
}

/// # Safety
/// `dest` and `src` valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src or past its end: a forward copy never reads a
        // byte it already overwrote.
        // SAFETY: as for memcpy.
        return unsafe { memcpy(dest, src, n) };
    }
    // dest overlaps the tail of src: copy backwards (DF = 1), then restore
    // DF = 0 as the ABI requires.
    // SAFETY: the caller guarantees both ranges are valid; n > 0 here
    // because dest - src < n.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        )
    };
    dest
}

/// # Safety
/// `dest` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") value as u8,
            options(nostack, preserves_flags),
        )
    };
    dest
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let differ: u8;
    let (after_a, after_b): (*const u8, *const u8);
    // SAFETY: the caller guarantees both ranges are valid; n > 0 so
    // `repe cmpsb` runs at least once and sets ZF.
    unsafe {
        asm!(
            "repe cmpsb",
            "setne {differ}",
            differ = out(reg_byte) differ,
            inout("rcx") n => _,
            inout("rsi") a => after_a,
            inout("rdi") b => after_b,
            options(nostack, readonly),
        )
    };
    if differ == 0 {
        return 0;
    }
    // Both pointers stopped one past the first differing byte.
    // SAFETY: that byte is inside both ranges.
    unsafe { i32::from(*after_a.sub(1)) - i32::from(*after_b.sub(1)) }
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

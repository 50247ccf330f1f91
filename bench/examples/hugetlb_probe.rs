//! Does userfaultfd work on hugetlbfs guest RAM here (issue #21)? Maps
//! 8 MiB of MAP_HUGETLB memory (needs `vm.nr_hugepages` >= 4), registers
//! it MISSING|WP, write-protects it, and resolves a missing fault with a
//! whole-page UFFDIO_COPY.
//!
//! `cargo run --release -p snapvm-bench --example hugetlb_probe`

use snapvm_snapshot::uffd::{feature, RegisterMode, Uffd};

const HUGE: usize = 2 << 20;

fn main() {
    let len = 4 * HUGE;
    // SAFETY: anonymous hugetlb mapping; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_HUGETLB
                | (21 << libc::MAP_HUGE_SHIFT),
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap MAP_HUGETLB: {}",
        std::io::Error::last_os_error()
    );
    let base = p as u64;
    // SAFETY: populate the first two huge pages.
    unsafe {
        *(p as *mut u8) = 1;
        *(p as *mut u8).add(HUGE) = 2;
    }
    println!(
        "available features: {:?}",
        snapvm_snapshot::uffd::feature_names(Uffd::available_features().unwrap())
    );
    let uffd = Uffd::new(feature::PAGEFAULT_FLAG_WP).expect("uffd");
    match uffd.register(
        base,
        len as u64,
        RegisterMode::MISSING.union(RegisterMode::WP),
    ) {
        Ok(()) => println!("register MISSING|WP: ok"),
        Err(e) => println!("register MISSING|WP: {e}"),
    }
    match uffd.write_protect(base, len as u64, true, false) {
        Ok(()) => println!("write-protect: ok"),
        Err(e) => println!("write-protect: {e}"),
    }
    match uffd.write_protect(base, HUGE as u64, false, false) {
        Ok(()) => println!("unprotect one page: ok"),
        Err(e) => println!("unprotect: {e}"),
    }
    let zero = vec![0u8; HUGE * 2];
    let src = ((zero.as_ptr() as usize).div_ceil(HUGE) * HUGE) as *const u8;
    match uffd.copy(base + 2 * HUGE as u64, src, HUGE as u64, false) {
        Ok(b) => println!("UFFDIO_COPY of a whole huge page: ok ({b})"),
        Err(e) => println!("UFFDIO_COPY: {e}"),
    }
    match uffd.zeropage(base + 3 * HUGE as u64, 4096, false) {
        Ok(b) => println!("UFFDIO_ZEROPAGE: ok ({b})"),
        Err(e) => println!("UFFDIO_ZEROPAGE: {e}"),
    }
    match uffd.copy(base + 3 * HUGE as u64, src, 4096, false) {
        Ok(b) => println!("UFFDIO_COPY of 4 KiB: ok ({b})"),
        Err(e) => println!("UFFDIO_COPY of 4 KiB: {e}"),
    }
}

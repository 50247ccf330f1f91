//! Fallible allocation helpers.
//!
//! The guest kernel's allocator cannot unwind, and an infallible allocation
//! that fails aborts the whole VM. Every allocation whose size a client
//! controls (keys, values, table growth, replies) goes through these, so
//! running out of memory becomes an `-OOM` reply instead of a dead guest.

use alloc::alloc::Layout;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// An allocation failed (or would exceed a limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocError;

/// A rough per-allocation overhead of a general-purpose allocator (header and
/// rounding), used only for memory accounting estimates.
pub const MALLOC_OVERHEAD: usize = 16;

/// Copies `bytes` into a new exactly-sized boxed slice.
pub fn try_copy(bytes: &[u8]) -> Result<Box<[u8]>, AllocError> {
    Ok(try_vec_from(bytes)?.into_boxed_slice())
}

/// Copies `bytes` into a new `Vec` with capacity exactly `bytes.len()`.
pub fn try_vec_from(bytes: &[u8]) -> Result<Vec<u8>, AllocError> {
    let mut v = Vec::new();
    v.try_reserve_exact(bytes.len()).map_err(|_| AllocError)?;
    v.extend_from_slice(bytes);
    Ok(v)
}

/// Makes room for `extra` more elements, failing instead of aborting.
pub fn try_grow<T>(v: &mut Vec<T>, extra: usize) -> Result<(), AllocError> {
    v.try_reserve(extra).map_err(|_| AllocError)
}

/// Boxes `value`, returning it back if the allocation fails.
///
/// `Box::try_new` is not stable yet, so this does what it would do.
pub fn try_box<T>(value: T) -> Result<Box<T>, T> {
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        return Ok(Box::new(value));
    }
    // SAFETY: `layout` has a non-zero size, which is all `alloc` requires.
    let ptr = unsafe { alloc::alloc::alloc(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(value);
    }
    // SAFETY: `ptr` is non-null and was returned by the global allocator for
    // `Layout::new::<T>()`, the layout `Box<T>` uses, so it is valid and
    // aligned for one `T`. `write` initialises it without reading the old
    // contents, and `Box::from_raw` then owns exactly that allocation.
    unsafe {
        ptr.write(value);
        Ok(Box::from_raw(ptr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(&*try_copy(b"abc").unwrap(), b"abc");
        let v = try_vec_from(b"xy").unwrap();
        assert_eq!(v.capacity(), 2);
        let b = try_box(alloc::string::String::from("s")).unwrap();
        assert_eq!(b.as_str(), "s");
        let z = try_box(()).unwrap();
        assert_eq!(*z, ());
        let mut v: Vec<u8> = Vec::new();
        assert!(try_grow(&mut v, usize::MAX).is_err());
    }
}

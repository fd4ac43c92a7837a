//! The counting allocator counts exactly: a test binary of its own, one test, so no other
//! thread allocates while it measures.

use candle_fit::train::memory::{self, CountingAllocator};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[test]
fn current_and_peak_bytes_are_exact() {
    assert!(memory::is_installed());
    let base = memory::reset_peak();
    let a: Vec<u8> = Vec::with_capacity(1 << 20);
    assert_eq!(memory::current_bytes() - base, 1 << 20);
    let b: Vec<u64> = Vec::with_capacity(1000);
    assert_eq!(memory::current_bytes() - base, (1 << 20) + 8000);
    drop(a);
    assert_eq!(memory::current_bytes() - base, 8000);
    assert_eq!(memory::peak_bytes() - base, (1 << 20) + 8000);
    let mut c = b;
    c.reserve_exact(2000);
    assert_eq!(memory::current_bytes() - base, 2000 * 8, "realloc counts the new size");
    drop(c);
    assert_eq!(memory::current_bytes(), base);
    assert_eq!(memory::reset_peak(), base);
    assert_eq!(memory::peak_bytes(), base);
}

// std::time::Instant::now reads CLOCK_MONOTONIC through the vDSO (std's
// Timespec::now); rustc links with its bundled lld, whose segments' addresses differ
// from their file offsets.
use std::time::Instant;

#[inline(never)]
fn measure() -> u128 {
    let t = Instant::now();
    let u = Instant::now();
    (u - t).as_nanos()
}

fn main() {
    let mut s = 0u128;
    for _ in 0..3 {
        s += measure();
    }
    println!("{}", s % 2);
}

//! What the kernel's events add up to: pure event → state, no I/O. Every table is bounded
//! and counts what it drops.

pub mod heap;
pub mod tasks;

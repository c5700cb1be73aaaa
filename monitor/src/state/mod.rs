//! What the kernel's events add up to: pure event → state, no I/O. Every table is bounded
//! and counts what it drops.
//!
//! `tasks` and `heap` are independent ledgers (`heap_groups` feeds `heap` from the kernel's
//! aggregates instead of block events); `attribution` ties heap blocks to tasks, and
//! `stream`, `intern` and `pending` are the bookkeeping both share; `health` says which
//! processes' figures are incomplete now (events lost, probes silent).

pub mod attribution;
pub mod health;
pub mod heap;
pub mod heap_groups;
pub mod heap_windows;
pub mod intern;
pub mod pending;
pub mod stream;
pub mod tasks;

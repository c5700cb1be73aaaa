//! What the kernel's events add up to: pure event → state, no I/O. Every table is bounded
//! and counts what it drops.
//!
//! `tasks` and `heap` are independent ledgers; `attribution` ties heap blocks to tasks, and
//! `stream`, `intern` and `pending` are the bookkeeping both share.

pub mod attribution;
pub mod heap;
pub mod intern;
pub mod pending;
pub mod stream;
pub mod tasks;

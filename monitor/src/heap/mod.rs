//! Heap lifetimes per allocation callsite, attributed to the tokio task that allocated.

pub mod ledger;
pub mod symbolize;
pub mod tracker;
pub mod unwind_table;

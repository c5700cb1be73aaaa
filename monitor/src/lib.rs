//! leakscope: finds task and heap leaks in running tokio services.
//!
//! Data flows one way, and each folder is one stage of it:
//! - `targets`: which processes to watch, and what `/proc` says about them;
//! - `discovery`: what a target's executable contains (task vtables, hook points, the
//!   allocator, unwind tables, symbols), read from the ELF file, no privileges needed;
//! - `bpf`: the kernel side as userspace sees it: load, attach, maps, counters;
//! - `state`: what the kernel's events add up to, per process: live tasks per spawn site,
//!   live heap per callsite, the stream's losses;
//! - `analysis`: leak verdicts, from each site's recent history;
//! - `export`: how it is shown: Prometheus text, JSON API types, text tables.
//!
//! `daemon` wires the stages together for the long-running job: it attaches and detaches
//! processes, drains the rings into the state and serves the exports.

pub mod analysis;
pub mod bpf;
pub mod daemon;
pub mod discovery;
pub mod export;
pub mod state;
pub mod targets;
pub mod timing;

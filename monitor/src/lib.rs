//! leakscope: finds task leaks in running tokio services.
//!
//! Data flows one way: `discovery` (what the target binary contains) decides where `probes`
//! attach; the kernel's `events` update the `tasks` ledger; `metrics` and the `daemon`'s HTTP
//! API export it.

pub mod daemon;
pub mod discovery;
pub mod events;
pub mod heap;
pub mod inspect;
pub mod kernel_btf;
pub mod metrics;
pub mod probes;
pub mod procfs;
pub mod tasks;

//! The kernel side, as userspace drives it: the embedded eBPF object loaded (`loader`), the
//! attach points decided (`plan`, pure), programs attached and detached (`attach`), heap
//! maps written (`heap_maps`) and their aggregates read (`heap_aggregates`), rings read
//! (`ring`), kernel counters and run statistics read (`counters`), the one kernel fact read
//! from BTF (`kernel_btf`), and what the kernel and the privileges allow, checked first
//! (`preflight`).

pub mod attach;
pub mod counters;
pub mod heap_aggregates;
pub mod heap_maps;
pub mod kernel_btf;
pub mod loader;
pub mod plan;
pub mod preflight;
pub mod ring;

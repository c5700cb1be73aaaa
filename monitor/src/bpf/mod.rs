//! The kernel side, as userspace drives it: the embedded eBPF object loaded, its programs
//! attached and detached, its maps written and read.

pub mod kernel_btf;
pub mod probes;
pub mod ring;

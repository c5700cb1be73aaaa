//! Which processes leakscope watches, and what `/proc` says about each.

pub mod maps;
pub mod procfs;

//! The allocator APIs leakscope knows: families, the role of each entry point and where
//! its arguments and result are, and the symbol tables that name them.

use serde::Serialize;

use super::super::ArgReg;

/// The allocator behind Rust's `#[global_allocator]`, as the shims' code shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GlobalAllocator {
    /// `std::alloc::System`: the shims forward to `__rdl_*`, which call libc's malloc family
    /// (or, in a custom wrapper, the shims reach libc's malloc family directly).
    System,
    /// jemalloc (tikv-jemallocator): the shims reach `_rjem_*` (or unprefixed `mallocx`, …).
    Jemalloc,
    /// mimalloc: the shims reach `mi_*`.
    Mimalloc,
    /// None of the above was reached (a custom allocator, or no shims were found).
    Unknown,
}

/// Where an entry point lives, by allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocFamily {
    /// One of the four `__rust_*` global-allocator shims of the executable.
    RustShim,
    /// The C malloc API of libc (a mapped libc, or the executable itself when it links libc
    /// statically).
    Libc,
    /// jemalloc's API (`_rjem_*` as tikv-jemallocator links it, or unprefixed).
    Jemalloc,
    /// mimalloc's API (`mi_*`).
    Mimalloc,
}

/// What an entry point does; fixes its argument registers (see [`AllocArgs::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocRole {
    /// `__rust_alloc(size, align) -> ptr`.
    Alloc,
    /// `__rust_alloc_zeroed(size, align) -> ptr`.
    AllocZeroed,
    /// `__rust_realloc(ptr, old_size, align, new_size) -> ptr`.
    Realloc,
    /// `__rust_dealloc(ptr, size, align)`.
    Dealloc,
    /// `malloc(size) -> ptr` (also `_rjem_malloc`, `mi_malloc`).
    Malloc,
    /// `calloc(nmemb, size) -> ptr`.
    Calloc,
    /// C `realloc(ptr, size) -> ptr` (also `_rjem_realloc`, `mi_realloc`).
    CRealloc,
    /// `free(ptr)`.
    Free,
    /// `posix_memalign(void **memptr, align, size) -> int`: the pointer is stored through
    /// `memptr`, the return value is 0 on success.
    PosixMemalign,
    /// `aligned_alloc(align, size) -> ptr`.
    AlignedAlloc,
    /// `memalign(align, size) -> ptr`.
    Memalign,
    /// `valloc(size) -> ptr`.
    Valloc,
    /// `pvalloc(size) -> ptr`.
    Pvalloc,
    /// jemalloc `mallocx(size, flags) -> ptr` (`MALLOCX_*` flags: alignment, zeroing, …).
    Mallocx,
    /// jemalloc `rallocx(ptr, size, flags) -> ptr`.
    Rallocx,
    /// jemalloc `xallocx(ptr, size, extra, flags) -> usable size` (resize in place only).
    Xallocx,
    /// jemalloc `sdallocx(ptr, size, flags)`.
    Sdallocx,
    /// jemalloc `dallocx(ptr, flags)`.
    Dallocx,
    /// mimalloc `mi_zalloc(size) -> ptr`.
    Zalloc,
    /// mimalloc `mi_malloc_aligned(size, align) -> ptr`.
    MallocAligned,
    /// mimalloc `mi_zalloc_aligned(size, align) -> ptr`.
    ZallocAligned,
    /// mimalloc `mi_realloc_aligned(ptr, size, align) -> ptr`.
    ReallocAligned,
    /// mimalloc `mi_free_size(ptr, size)` / `mi_free_size_aligned(ptr, size, align)`.
    FreeSized,
}

impl AllocRole {
    /// The entry point releases a block (and allocates none).
    pub fn frees(self) -> bool {
        matches!(
            self,
            AllocRole::Dealloc
                | AllocRole::Free
                | AllocRole::Sdallocx
                | AllocRole::Dallocx
                | AllocRole::FreeSized
        )
    }

    /// The entry point may move a block (old pointer in, new pointer out).
    pub fn resizes(self) -> bool {
        matches!(
            self,
            AllocRole::Realloc
                | AllocRole::CRealloc
                | AllocRole::Rallocx
                | AllocRole::Xallocx
                | AllocRole::ReallocAligned
        )
    }
}

/// What comes back in `rax`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetValue {
    /// The new block's address (null on failure).
    Ptr,
    /// An `int` status (0 = success); the block's address was stored through
    /// [`AllocArgs::out_ptr`].
    Status,
    /// The block's usable size after the call (`xallocx`).
    UsableSize,
    /// Nothing of interest.
    #[default]
    Nothing,
}

/// Which System V argument register carries what, on entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AllocArgs {
    /// The block being freed or resized.
    pub ptr: Option<ArgReg>,
    /// Bytes requested (allocation), or the size of the block being freed (sized frees:
    /// `__rust_dealloc`, `sdallocx`, `mi_free_size`).
    pub size: Option<ArgReg>,
    /// `calloc`'s element count (bytes = count × size).
    pub count: Option<ArgReg>,
    pub align: Option<ArgReg>,
    /// `__rust_realloc`'s old size.
    pub old_size: Option<ArgReg>,
    /// The requested size of a resize.
    pub new_size: Option<ArgReg>,
    /// jemalloc `MALLOCX_*` flags (they can encode alignment and zeroing).
    pub flags: Option<ArgReg>,
    /// `posix_memalign`'s `void **memptr`.
    pub out_ptr: Option<ArgReg>,
    pub ret: RetValue,
}

impl AllocArgs {
    /// The System V register assignment of `role`'s C/Rust signature.
    pub fn of(role: AllocRole) -> AllocArgs {
        use AllocRole::*;
        use ArgReg::*;
        let none = AllocArgs::default();
        match role {
            Alloc | AllocZeroed | MallocAligned | ZallocAligned => AllocArgs {
                size: Some(Rdi),
                align: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            Realloc => AllocArgs {
                ptr: Some(Rdi),
                old_size: Some(Rsi),
                align: Some(Rdx),
                new_size: Some(Rcx),
                ret: RetValue::Ptr,
                ..none
            },
            Dealloc => AllocArgs {
                ptr: Some(Rdi),
                size: Some(Rsi),
                align: Some(Rdx),
                ..none
            },
            Malloc | Valloc | Pvalloc | Zalloc => AllocArgs {
                size: Some(Rdi),
                ret: RetValue::Ptr,
                ..none
            },
            Calloc => AllocArgs {
                count: Some(Rdi),
                size: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            CRealloc => AllocArgs {
                ptr: Some(Rdi),
                new_size: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            Free | Dallocx => AllocArgs {
                ptr: Some(Rdi),
                flags: (role == Dallocx).then_some(Rsi),
                ..none
            },
            PosixMemalign => AllocArgs {
                out_ptr: Some(Rdi),
                align: Some(Rsi),
                size: Some(Rdx),
                ret: RetValue::Status,
                ..none
            },
            AlignedAlloc | Memalign => AllocArgs {
                align: Some(Rdi),
                size: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            Mallocx => AllocArgs {
                size: Some(Rdi),
                flags: Some(Rsi),
                ret: RetValue::Ptr,
                ..none
            },
            Rallocx => AllocArgs {
                ptr: Some(Rdi),
                new_size: Some(Rsi),
                flags: Some(Rdx),
                ret: RetValue::Ptr,
                ..none
            },
            // xallocx(ptr, size, extra, flags): `extra` (rdx) is not modelled.
            Xallocx => AllocArgs {
                ptr: Some(Rdi),
                new_size: Some(Rsi),
                flags: Some(Rcx),
                ret: RetValue::UsableSize,
                ..none
            },
            Sdallocx => AllocArgs {
                ptr: Some(Rdi),
                size: Some(Rsi),
                flags: Some(Rdx),
                ..none
            },
            ReallocAligned => AllocArgs {
                ptr: Some(Rdi),
                new_size: Some(Rsi),
                align: Some(Rdx),
                ret: RetValue::Ptr,
                ..none
            },
            FreeSized => AllocArgs {
                ptr: Some(Rdi),
                size: Some(Rsi),
                ..none
            },
        }
    }

    /// Every argument register named above, in argument order.
    pub fn registers(&self) -> Vec<ArgReg> {
        let mut regs: Vec<ArgReg> = [
            self.ptr,
            self.size,
            self.count,
            self.align,
            self.old_size,
            self.new_size,
            self.flags,
            self.out_ptr,
        ]
        .into_iter()
        .flatten()
        .collect();
        regs.sort_by_key(|r| r.position());
        regs.dedup();
        regs
    }

    /// The registers a leak-tracking hook cannot do without, which the entry probe must
    /// therefore see unchanged: the block pointer of frees and resizes, the size (and count,
    /// and `memptr`) of allocations and the new size of resizes. Alignment, flags, the old
    /// size of a resize and the size passed to a sized free are extras the tracker knows or
    /// does not need; [`ProbeSite::intact_args`](super::ProbeSite::intact_args) says whether
    /// they are still readable.
    pub fn essential(&self, role: AllocRole) -> Vec<ArgReg> {
        let mut regs = Vec::new();
        if role.frees() {
            regs.extend(self.ptr);
        } else if role.resizes() {
            regs.extend(self.ptr);
            regs.extend(self.new_size);
        } else {
            regs.extend(self.size);
            regs.extend(self.count);
            regs.extend(self.out_ptr);
        }
        regs
    }
}

/// The four shims, by the last segment of their demangled name.
pub(super) const SHIMS: [(&str, AllocRole); 4] = [
    ("__rust_alloc", AllocRole::Alloc),
    ("__rust_alloc_zeroed", AllocRole::AllocZeroed),
    ("__rust_realloc", AllocRole::Realloc),
    ("__rust_dealloc", AllocRole::Dealloc),
];

/// The C malloc family (glibc, musl).
pub(super) const LIBC_API: [(&str, AllocRole); 9] = [
    ("malloc", AllocRole::Malloc),
    ("calloc", AllocRole::Calloc),
    ("realloc", AllocRole::CRealloc),
    ("free", AllocRole::Free),
    ("posix_memalign", AllocRole::PosixMemalign),
    ("aligned_alloc", AllocRole::AlignedAlloc),
    ("memalign", AllocRole::Memalign),
    ("valloc", AllocRole::Valloc),
    ("pvalloc", AllocRole::Pvalloc),
];

/// jemalloc's public API beyond the C malloc family it also exports, without its prefix
/// (tikv-jemalloc-sys links it as `_rjem_<name>`).
pub(super) const JEMALLOC_EXTRA_API: [(&str, AllocRole); 5] = [
    ("mallocx", AllocRole::Mallocx),
    ("rallocx", AllocRole::Rallocx),
    ("xallocx", AllocRole::Xallocx),
    ("sdallocx", AllocRole::Sdallocx),
    ("dallocx", AllocRole::Dallocx),
];

/// Names only jemalloc defines (so an unprefixed jemalloc is recognised by them).
pub(super) const JEMALLOC_ONLY: [&str; 6] = [
    "mallocx", "rallocx", "xallocx", "sdallocx", "dallocx", "nallocx",
];

/// The prefix tikv-jemalloc-sys gives jemalloc's symbols on Linux.
pub(super) const JEMALLOC_PREFIX: &str = "_rjem_";

/// mimalloc's API (the mimalloc crate's `GlobalAlloc` uses `mi_malloc_aligned`,
/// `mi_zalloc_aligned`, `mi_realloc_aligned` and `mi_free`).
pub(super) const MIMALLOC_API: [(&str, AllocRole); 15] = [
    ("mi_malloc", AllocRole::Malloc),
    ("mi_zalloc", AllocRole::Zalloc),
    ("mi_calloc", AllocRole::Calloc),
    ("mi_realloc", AllocRole::CRealloc),
    ("mi_free", AllocRole::Free),
    ("mi_malloc_aligned", AllocRole::MallocAligned),
    ("mi_zalloc_aligned", AllocRole::ZallocAligned),
    ("mi_realloc_aligned", AllocRole::ReallocAligned),
    ("mi_posix_memalign", AllocRole::PosixMemalign),
    ("mi_aligned_alloc", AllocRole::AlignedAlloc),
    ("mi_memalign", AllocRole::Memalign),
    ("mi_valloc", AllocRole::Valloc),
    ("mi_free_size", AllocRole::FreeSized),
    ("mi_free_size_aligned", AllocRole::FreeSized),
    ("mi_free_aligned", AllocRole::Free),
];

pub(super) fn is_libc_name(name: &str) -> bool {
    name.starts_with("libc.so")
        || (name.starts_with("libc-") && name.ends_with(".so"))
        || name.starts_with("libc.musl")
        || name.starts_with("ld-musl")
}

/// Symbols that make a non-libc library worth a full look.
pub(super) fn interesting_lib_symbol(name: &str) -> bool {
    name == "malloc"
        || name == "free"
        || name.starts_with(JEMALLOC_PREFIX)
        || JEMALLOC_ONLY.contains(&name)
        || MIMALLOC_API.iter().any(|(n, _)| *n == name)
}

/// The last `::` segment of a (demangled) name.
pub(super) fn last_segment(name: &str) -> &str {
    name.rsplit("::").next().unwrap_or(name)
}

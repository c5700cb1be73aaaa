//! Where each probe goes, decided from what discovery found: pure functions of the
//! analysed binary, no kernel and no aya, so `inspect` shows exactly what the daemon would
//! attach and the rules are tested on the host.

use std::path::PathBuf;

use monitor_common::names::program;
use monitor_common::{HookCookie, TaskEventKind};
use serde::Serialize;
use thiserror::Error;

use crate::discovery::alloc::{AllocFamily, AllocRole, AllocatorImage, GlobalAllocator};
use crate::discovery::{HookKind, TargetImage};

#[derive(Debug, Error)]
pub enum PlanError {
    #[error(
        "{0} has no hook point leakscope can use for spawns: {1}. Is it a tokio binary that \
         spawns tasks? `leakscope inspect` shows what was found"
    )]
    NoSpawnHook(String, String),
    #[error("{symbol}: the task header arrives in {register}, which no task hook program reads")]
    UnsupportedRegister { symbol: String, register: String },
}

/// Where one task hook goes in the executable, and what it tells the program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskAttachPoint {
    /// The task hook program for the register that holds the task header.
    pub program: &'static str,
    pub file_offset: u64,
    /// A [`HookCookie`]: the event kind and where the vtable and the task id are.
    pub cookie: u64,
    pub symbol: String,
}

/// The task hooks of `image`: one per hook point discovery verified, completion hooks
/// first. Uprobes go in one at a time; with the spawn hooks first, a task spawned and
/// completed while the rest went in would be seen spawning and never completing (alive
/// for ever, under load at attach). In this order such a task's completion is only
/// untracked, as any task's from before attach.
pub fn task_points(image: &TargetImage) -> Result<Vec<TaskAttachPoint>, PlanError> {
    if !image.hooks.iter().any(|h| {
        matches!(
            h.kind,
            HookKind::SpawnOwned | HookKind::SpawnBlocking | HookKind::FirstPoll
        )
    }) {
        return Err(PlanError::NoSpawnHook(
            image.path.display().to_string(),
            image.warnings.join("; "),
        ));
    }
    let mut hooks: Vec<_> = image.hooks.iter().collect();
    hooks.sort_by_key(|hook| hook.kind != HookKind::Complete);
    hooks
        .into_iter()
        .map(|hook| {
            let kind = match hook.kind {
                HookKind::SpawnOwned | HookKind::SpawnBlocking => TaskEventKind::Spawn,
                HookKind::Complete => TaskEventKind::Complete,
                HookKind::FirstPoll => TaskEventKind::FirstPoll,
            };
            let cookie = HookCookie {
                kind: kind as u32,
                vtable_offset: image.layout.vtable_offset as u32,
                // Where the record keeps `id_offset` (0: it has none, no id is read).
                vtable_id_field: image.layout.vtable.id_offset_field().unwrap_or(0) as u32,
            };
            let program = *program::TASK_HOOKS
                .get(hook.header_arg.position())
                .ok_or_else(|| PlanError::UnsupportedRegister {
                    symbol: hook.symbol.clone(),
                    register: format!("{:?}", hook.header_arg),
                })?;
            Ok(TaskAttachPoint {
                program,
                file_offset: hook.file_offset,
                cookie: cookie.encode(),
                symbol: hook.symbol.clone(),
            })
        })
        .collect()
}

/// The heap programs, by what they read at their attach point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HeapProgram {
    /// size in arg 0: `__rust_alloc`, `__rust_alloc_zeroed`, `malloc`, `valloc`, ...
    AllocEntry,
    /// `calloc(n, size)`.
    CallocEntry,
    /// size in arg 1: `aligned_alloc`, `memalign`.
    AlignedEntry,
    /// `posix_memalign(&out, align, size)`.
    PosixMemalignEntry,
    /// `realloc(ptr, size)`.
    ReallocEntry,
    /// `__rust_realloc(ptr, old_size, align, new_size)`.
    RustReallocEntry,
    /// pointer in arg 0: `free`, `__rust_dealloc`, ...
    FreeEntry,
    /// Return of any allocating function (a uretprobe at the entry program's site).
    AllocReturn,
}

impl HeapProgram {
    pub const ALL: [HeapProgram; 8] = [
        HeapProgram::AllocEntry,
        HeapProgram::CallocEntry,
        HeapProgram::AlignedEntry,
        HeapProgram::PosixMemalignEntry,
        HeapProgram::ReallocEntry,
        HeapProgram::RustReallocEntry,
        HeapProgram::FreeEntry,
        HeapProgram::AllocReturn,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            HeapProgram::AllocEntry => program::HEAP_ALLOC_ENTRY,
            HeapProgram::CallocEntry => program::HEAP_CALLOC_ENTRY,
            HeapProgram::AlignedEntry => program::HEAP_ALIGNED_ENTRY,
            HeapProgram::PosixMemalignEntry => program::HEAP_POSIX_MEMALIGN_ENTRY,
            HeapProgram::ReallocEntry => program::HEAP_REALLOC_ENTRY,
            HeapProgram::RustReallocEntry => program::HEAP_RUST_REALLOC_ENTRY,
            HeapProgram::FreeEntry => program::HEAP_FREE_ENTRY,
            HeapProgram::AllocReturn => program::HEAP_ALLOC_RETURN,
        }
    }
}

/// Where one heap program goes.
#[derive(Debug, Clone, Serialize)]
pub struct HeapAttachPoint {
    pub program: HeapProgram,
    /// File the offset is in (the executable, or a library as the process maps it).
    pub target: PathBuf,
    pub file_offset: u64,
    pub symbol: String,
    /// For entry programs: where the function's arguments are at the probed instruction
    /// (`monitor_common::heap::arg_location`); 0 when all are in their own registers.
    pub arg_cookie: u64,
}

/// Where the heap programs go for this process's allocator.
///
/// One layer of the allocator stack is hooked, so that each allocation is seen once:
/// - System allocator: libc's malloc family, in the libc this process maps (per-process
///   probes: other processes sharing that libc are not touched). Rust's allocations reach
///   it through `__rdl_*`, and C code calling `malloc` directly is seen too, including
///   the large blocks glibc serves with mmap. Without a mapped libc (a static binary),
///   the Rust shims (`__rust_alloc`, ...) are hooked instead.
/// - jemalloc / mimalloc as `#[global_allocator]`: their own API (`_rjem_*`, `mi_*`), and
///   libc's malloc family for C code. The
///   Rust shims are not enough there: the crate that declares the global allocator gets the
///   shim inlined by (default, crate-local) ThinLTO and calls the allocator directly, which
///   was seen to bypass `__rust_alloc` for most of the program's own allocations.
///
/// Entry probes sit on the first instruction the kernel emulates (see `discovery::alloc`);
/// returns use a uretprobe at the same site, since a uprobe on a `ret` is single-stepped
/// (about 10x dearer, measured).
pub fn heap_points(allocators: &AllocatorImage) -> Vec<HeapAttachPoint> {
    let has_libc = allocators
        .functions
        .iter()
        .any(|f| f.family == AllocFamily::Libc && f.role == AllocRole::Malloc);
    let families: &[AllocFamily] = match allocators.global {
        // The global allocator's own API for Rust's allocations, plus libc's for C code
        // that calls `malloc` directly (the two are separate heaps; should one call the
        // other, the nested call is not counted twice: see `monitor-ebpf/src/heap.rs`).
        GlobalAllocator::Jemalloc if has_libc => &[AllocFamily::Jemalloc, AllocFamily::Libc],
        GlobalAllocator::Jemalloc => &[AllocFamily::Jemalloc],
        GlobalAllocator::Mimalloc if has_libc => &[AllocFamily::Mimalloc, AllocFamily::Libc],
        GlobalAllocator::Mimalloc => &[AllocFamily::Mimalloc],
        // System, or not recognisable (a stripped binary hides its shims): libc's malloc
        // family sees whatever reaches libc.
        _ if has_libc => &[AllocFamily::Libc],
        _ => &[AllocFamily::RustShim],
    };
    let mut points: Vec<HeapAttachPoint> = Vec::new();
    for function in allocators
        .functions
        .iter()
        .filter(|f| families.contains(&f.family))
    {
        let programs: &[HeapProgram] = match function.role {
            AllocRole::Alloc
            | AllocRole::AllocZeroed
            | AllocRole::Malloc
            | AllocRole::Zalloc
            | AllocRole::MallocAligned
            | AllocRole::ZallocAligned
            | AllocRole::Mallocx
            | AllocRole::Valloc
            | AllocRole::Pvalloc => &[HeapProgram::AllocEntry, HeapProgram::AllocReturn],
            AllocRole::Calloc => &[HeapProgram::CallocEntry, HeapProgram::AllocReturn],
            AllocRole::AlignedAlloc | AllocRole::Memalign => {
                &[HeapProgram::AlignedEntry, HeapProgram::AllocReturn]
            }
            AllocRole::PosixMemalign => {
                &[HeapProgram::PosixMemalignEntry, HeapProgram::AllocReturn]
            }
            AllocRole::Realloc => &[HeapProgram::RustReallocEntry, HeapProgram::AllocReturn],
            AllocRole::CRealloc | AllocRole::Rallocx | AllocRole::ReallocAligned => {
                &[HeapProgram::ReallocEntry, HeapProgram::AllocReturn]
            }
            AllocRole::Dealloc
            | AllocRole::Free
            | AllocRole::Sdallocx
            | AllocRole::Dallocx
            | AllocRole::FreeSized => &[HeapProgram::FreeEntry],
            // In-place resize: the block keeps its address; its new size is not tracked.
            AllocRole::Xallocx => &[],
        };
        for &program in programs {
            // Aliases (one function, several names) are attached once.
            if points.iter().any(|p| {
                p.program == program
                    && p.file_offset == function.entry_probe.file_offset
                    && p.target == function.file
            }) {
                continue;
            }
            points.push(HeapAttachPoint {
                program,
                target: function.file.clone(),
                file_offset: function.entry_probe.file_offset,
                symbol: function.symbol.clone(),
                // Only entry programs read arguments; a return program's cookie is unused.
                arg_cookie: function.entry_probe.arg_cookie(),
            });
        }
    }
    points
}

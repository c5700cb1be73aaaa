//! Names of the eBPF object's maps and programs, the one list both sides follow.
//!
//! On the BPF side a map's name is its static's name and a program's its function's
//! (`#[map]` and `#[uprobe]` take no constant), so `monitor-ebpf` spells them there, and a
//! test in `monitor/src/bpf` reads the built object and checks it declares exactly these.
//! Userspace looks everything up through these constants.

/// Maps.
pub mod map {
    /// Ring buffer of `TaskEvent`s.
    pub const TASK_EVENTS: &str = "TASK_EVENTS";
    /// Per-CPU failure counters of the task hooks (`crate::counter`).
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-CPU sequence numbers of task events.
    pub const SEQ: &str = "SEQ";
    /// Tasks already reported by a first-poll hook.
    pub const POLLED: &str = "POLLED";
    /// Ring buffer of `HeapEvent`s.
    pub const HEAP_EVENTS: &str = "HEAP_EVENTS";
    /// Per-CPU failure counters of the heap probes (`crate::heap::heap_counter`).
    pub const HEAP_COUNTERS: &str = "HEAP_COUNTERS";
    /// Per-CPU sequence numbers of heap events.
    pub const HEAP_SEQ: &str = "HEAP_SEQ";
    /// pid → `HeapTarget`: the processes whose heap is tracked.
    pub const HEAP_TARGETS: &str = "HEAP_TARGETS";
    /// Unwind rows of every watched executable.
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// 4 KiB-bucket index into `UNWIND_ROWS`.
    pub const UNWIND_BUCKETS: &str = "UNWIND_BUCKETS";
    /// Allocation entries waiting for their return, per thread (task storage: no capacity,
    /// so not in [`HEAP_ONLY_MINIMUM`]).
    pub const PENDING: &str = "PENDING";
    /// Blocks allocated and not yet freed.
    pub const OUTSTANDING: &str = "OUTSTANDING";
    /// Per-pid frees of blocks allocated before attach.
    pub const UNTRACKED_FREES: &str = "UNTRACKED_FREES";
    /// Ring buffer of `ExecEvent`s.
    pub const EXEC_EVENTS: &str = "EXEC_EVENTS";
    /// `GroupKey` → `GroupCounters`: live heap aggregated in the kernel.
    pub const HEAP_GROUPS: &str = "HEAP_GROUPS";
    /// `TaskKey` → the task's vtable, for the aggregates' task sites (LRU).
    pub const TASK_VTABLES: &str = "TASK_VTABLES";
    /// Per-CPU room for one stack, unwound before its group is known to be new.
    pub const HEAP_STACK_SCRATCH: &str = "HEAP_STACK_SCRATCH";
    /// How many tombstones `OUTSTANDING` holds (`crate::heap::tombstones`).
    pub const TOMBSTONES: &str = "TOMBSTONES";

    pub const ALL: [&str; 18] = [
        TASK_EVENTS,
        COUNTERS,
        SEQ,
        POLLED,
        HEAP_EVENTS,
        HEAP_COUNTERS,
        HEAP_SEQ,
        HEAP_TARGETS,
        UNWIND_ROWS,
        UNWIND_BUCKETS,
        PENDING,
        OUTSTANDING,
        UNTRACKED_FREES,
        EXEC_EVENTS,
        HEAP_GROUPS,
        TASK_VTABLES,
        HEAP_STACK_SCRATCH,
        TOMBSTONES,
    ];

    /// The maps only heap tracking uses, created at their smallest (entries; one page for
    /// the ring buffer) when it is off.
    pub const HEAP_ONLY_MINIMUM: [(&str, u32); 8] = [
        (HEAP_GROUPS, 1),
        (TASK_VTABLES, 1),
        (OUTSTANDING, 1),
        (HEAP_TARGETS, 1),
        (UNTRACKED_FREES, 1),
        (UNWIND_ROWS, 1),
        (UNWIND_BUCKETS, 1),
        (HEAP_EVENTS, 4096),
    ];
}

/// Programs.
pub mod program {
    /// The task hook programs, indexed by the System V position of the argument register
    /// that holds the task header (0 = rdi, 1 = rsi, 2 = rdx, 3 = rcx).
    pub const TASK_HOOKS: [&str; 4] = [
        "task_hook_rdi",
        "task_hook_rsi",
        "task_hook_rdx",
        "task_hook_rcx",
    ];
    /// Size in arg 0: `malloc`, `__rust_alloc`, ...
    pub const HEAP_ALLOC_ENTRY: &str = "heap_alloc_entry";
    /// `calloc(n, size)`.
    pub const HEAP_CALLOC_ENTRY: &str = "heap_calloc_entry";
    /// Size in arg 1: `aligned_alloc`, `memalign`.
    pub const HEAP_ALIGNED_ENTRY: &str = "heap_aligned_entry";
    /// `posix_memalign(&out, align, size)`.
    pub const HEAP_POSIX_MEMALIGN_ENTRY: &str = "heap_posix_memalign_entry";
    /// `realloc(ptr, size)`.
    pub const HEAP_REALLOC_ENTRY: &str = "heap_realloc_entry";
    /// `__rust_realloc(ptr, old_size, align, new_size)`.
    pub const HEAP_RUST_REALLOC_ENTRY: &str = "heap_rust_realloc_entry";
    /// Pointer in arg 0: `free`, `__rust_dealloc`, ...
    pub const HEAP_FREE_ENTRY: &str = "heap_free_entry";
    /// Return of any allocating function (a uretprobe).
    pub const HEAP_ALLOC_RETURN: &str = "heap_alloc_return";

    /// The `sched_process_exec` raw tracepoint: reports every exec on the host.
    pub const PROCESS_EXEC: &str = "process_exec";

    pub const HEAP: [&str; 8] = [
        HEAP_ALLOC_ENTRY,
        HEAP_CALLOC_ENTRY,
        HEAP_ALIGNED_ENTRY,
        HEAP_POSIX_MEMALIGN_ENTRY,
        HEAP_REALLOC_ENTRY,
        HEAP_RUST_REALLOC_ENTRY,
        HEAP_FREE_ENTRY,
        HEAP_ALLOC_RETURN,
    ];
}

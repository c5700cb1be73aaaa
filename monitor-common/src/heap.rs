//! Heap events: allocations and frees of tracked memory, with the allocating stack.

/// Return addresses captured per allocation (innermost first).
pub const HEAP_FRAMES: usize = 16;

/// Allocations tracked at once across all watched processes (kernel map capacity).
pub const OUTSTANDING_MAX: u32 = 1 << 20;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapEventKind {
    Alloc = 1,
    Free = 2,
}

impl HeapEventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Alloc),
            2 => Some(Self::Free),
            _ => None,
        }
    }
}

/// One allocation or free of a tracked block, as written into the heap ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapEvent {
    pub ktime_ns: u64,
    /// Per-CPU sequence number (shared with nothing else: the heap stream has its own).
    pub seq: u64,
    /// Address of the block (runtime).
    pub addr: u64,
    /// Size in bytes (for a free, the size recorded at allocation).
    pub size: u64,
    /// Hash of `frames[..nframes]`: equal stacks, equal hash (callsite cache key).
    pub stack_hash: u64,
    /// Id of the tokio task the allocating thread was polling (0: none).
    pub task_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// A [`HeapEventKind`] value.
    pub kind: u32,
    /// Valid entries in `frames` (allocations only).
    pub nframes: u32,
    pub _pad: u32,
    /// Runtime return addresses, innermost first: `frames[0]` is in the allocator's caller.
    pub frames: [u64; HEAP_FRAMES],
}

const _: () = assert!(core::mem::size_of::<HeapEvent>() == 72 + 8 * HEAP_FRAMES);

/// Key of the kernel's outstanding-allocation map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockKey {
    pub addr: u64,
    pub pid: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<BlockKey>() == 16);

/// What the kernel remembers of an outstanding block until it is freed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    pub size: u64,
    pub stack_hash: u64,
    pub task_id: u64,
}

const _: () = assert!(core::mem::size_of::<BlockInfo>() == 24);

/// Per-process settings of the heap probes (kernel map keyed by pid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapTarget {
    /// Runtime minus link-time address of the executable (unwind table lookups).
    pub load_bias: u64,
    /// Offset of the current-task-id slot from the thread pointer; 0: unknown.
    pub task_slot_fs_offset: i64,
    /// Offset of `thread.fsbase` in the kernel's `task_struct`.
    pub fsbase_offset: u64,
    /// Rows of the executable's unwind table in `UNWIND_ROWS`.
    pub unwind_rows: u32,
    /// Record 1 in `sample_every` allocations (1: all).
    pub sample_every: u32,
}

const _: () = assert!(core::mem::size_of::<HeapTarget>() == 32);

//! Heap events: allocations and frees of tracked memory, with the allocating stack.

/// Return addresses captured per allocation, after `first_pc` (innermost first).
pub const HEAP_FRAMES: usize = crate::unwind::MAX_FRAMES;

/// Rows of unwind tables the kernel holds, for all watched executables together.
pub const UNWIND_ROWS_MAX: u32 = 1 << 19;

/// Entries of the unwind tables' bucket indexes the kernel holds, for all watched
/// executables together: one per 4 KiB of code, so 1 GiB of code in all.
pub const UNWIND_BUCKETS_MAX: u32 = 1 << 18;

/// Indexes into the per-CPU `HEAP_COUNTERS` array.
pub mod heap_counter {
    /// Events lost because the heap ring buffer was full (the block is then not tracked).
    pub const RINGBUF_FULL: u32 = 0;
    /// Blocks not tracked because the outstanding map was full.
    pub const OUTSTANDING_FULL: u32 = 1;
    /// Allocation entries not remembered until their return (pending map full).
    pub const PENDING_FULL: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Allocations tracked at once across all watched processes (kernel map capacity).
pub const OUTSTANDING_MAX: u32 = 1 << 18;

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
    /// Where the allocator returned to: a pc in its caller (allocations only).
    pub first_pc: u64,
    /// Further return addresses up the stack, innermost first (runtime addresses).
    pub frames: [u64; HEAP_FRAMES],
}

const _: () = assert!(core::mem::size_of::<HeapEvent>() == 80 + 8 * HEAP_FRAMES);

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
    /// Link-time start of the code the executable's unwind table covers.
    pub text_start: u64,
    /// First row of the executable's unwind table in `UNWIND_ROWS`.
    pub unwind_first: u32,
    /// Rows of the executable's unwind table.
    pub unwind_rows: u32,
    /// First entry of the table's bucket index in `UNWIND_BUCKETS` (row indexes there are
    /// relative to `unwind_first`).
    pub bucket_first: u32,
    /// Buckets of the index (it has one entry more).
    pub buckets: u32,
    /// Track 1 in `2^sample_shift` blocks, chosen by address (0: every block). Frees use
    /// the same choice, so a sampled block is always matched by its free.
    pub sample_shift: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<HeapTarget>() == 56);

/// Whether the block at `addr` is tracked under `2^shift` sampling: a multiplicative hash
/// of the address (without its alignment bits), so the choice is the same at free time.
#[inline(always)]
pub const fn sampled(addr: u64, shift: u32) -> bool {
    if shift == 0 || shift >= 64 {
        return true;
    }
    ((addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - shift)) == 0
}

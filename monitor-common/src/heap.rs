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
    /// Allocation entries not remembered until their return (the thread's `PENDING` task
    /// storage could not be made).
    pub const PENDING_FULL: u32 = 2;
    /// Blocks not tracked because the kernel's group map (`HEAP_GROUPS`) was full.
    pub const GROUPS_FULL: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Allocations tracked at once across all watched processes (kernel map capacity).
pub const OUTSTANDING_MAX: u32 = 1 << 18;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapEventKind {
    Alloc = 1,
    Free = 2,
    /// The kernel started aggregating a new group (see [`GroupKey`]): the event carries the
    /// group's stack (`stack_hash`, `first_pc`, `frames`) so that userspace can name it.
    /// The only heap event of a process tracked by aggregates.
    NewGroup = 3,
}

impl HeapEventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Alloc),
            2 => Some(Self::Free),
            3 => Some(Self::NewGroup),
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
    /// The allocating stack's hash; under aggregation, the group's `site` (for a task cell,
    /// the task's vtable).
    pub stack_hash: u64,
    pub task_id: u64,
    /// Under aggregation: the group's `task` (see [`GroupKey`]).
    pub group_task: u64,
    /// Under aggregation: the group's `kind` ([`group_kind`]).
    pub group_kind: u32,
    /// 1: counted in `HEAP_GROUPS` (the free subtracts there); 0: reported by events;
    /// [`BLOCK_FREED`]: freed, the entry kept for the next block at its address.
    pub aggregated: u32,
}

const _: () = assert!(core::mem::size_of::<BlockInfo>() == 40);

/// `BlockInfo::aggregated` of a freed block of an aggregated process whose entry the free
/// left in the outstanding map (a tombstone) instead of deleting it: allocators hand the
/// same addresses out again and again, and the next block at the address then takes the
/// entry over in place. A delete at each free and an insert at each allocation were the
/// dearest map operations of the probes (0.23 µs a pair together, measured). A tombstone
/// is not a block: a free finding one is a free of an untracked block.
pub const BLOCK_FREED: u32 = 2;

/// Slots of the `TOMBSTONES` array: tombstones left minus those taken over (the probes'
/// count), tombstones dropped by userspace with a process's blocks (userspace's; their
/// difference is how many the map holds), and how many it may hold (set by userspace at
/// load, [`tombstones_max`]; 0: none). Past that, frees delete their entries as before.
pub mod tombstones {
    pub const LEFT: u32 = 0;
    pub const PURGED: u32 = 1;
    pub const MAX: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Tombstones an outstanding map of `max_blocks` entries may hold: an eighth of it, so live
/// blocks always have at least seven eighths of `--heap-max-blocks` (the map cannot tell a
/// tombstone from a block when it is full, and a block it cannot hold is not tracked).
pub const fn tombstones_max(max_blocks: u32) -> u32 {
    max_blocks / 8
}

/// (process, callsite, task site) groups the kernel aggregates at once, across processes.
pub const GROUPS_MAX: u32 = 1 << 16;
/// Tasks whose spawn vtable the kernel remembers at once, across processes (least recently
/// used forgotten first: a task still allocating stays).
pub const TASK_VTABLES_MAX: u32 = 1 << 16;

/// What a group aggregates (`GroupKey::kind`).
pub mod group_kind {
    /// Blocks allocated at one stack (`site` is the stack's hash).
    pub const CALLSITE: u32 = 0;
    /// Tokio task cells (`site` is the task's vtable): a block found at a task's header
    /// when the task is spawned moves here from its callsite group.
    pub const TASK_CELL: u32 = 1;
}

/// `GroupKey::task` values other than a task's vtable.
pub mod group_task {
    /// Allocated outside any tokio task.
    pub const NONE: u64 = 0;
    /// Allocated by a task whose spawn the kernel did not see (before attach).
    pub const UNKNOWN: u64 = 1;
}

/// Key of the kernel's live-heap aggregates (`HEAP_GROUPS`): the exact figures of every
/// block of a process allocated at one stack by tasks of one spawn site.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub pid: u32,
    /// A [`group_kind`] value.
    pub kind: u32,
    /// Stack hash (callsite groups) or the task's vtable (task cells).
    pub site: u64,
    /// The vtable of the task that allocated, or a [`group_task`] value.
    pub task: u64,
}

const _: () = assert!(core::mem::size_of::<GroupKey>() == 24);

/// A group's running counts, only ever added to (atomically, by the probes): its live
/// figures are `allocated - released`. A block moving to a task cell group is released
/// from its callsite group and allocated in the cell's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCounters {
    pub allocated_blocks: u64,
    pub allocated_bytes: u64,
    pub released_blocks: u64,
    pub released_bytes: u64,
}

const _: () = assert!(core::mem::size_of::<GroupCounters>() == 32);

/// Key of the kernel's task-id → spawn-vtable map (`TASK_VTABLES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskKey {
    pub task_id: u64,
    pub pid: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<TaskKey>() == 16);

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
    /// 1: the probes aggregate live figures per group in the kernel (`HEAP_GROUPS`) and
    /// report only new groups; 0: one event per allocation and per free.
    pub aggregate: u32,
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

/// Where a heap entry program reads the probed function's arguments. An entry probe may sit a
/// few instructions into the function (on one the kernel emulates, see
/// `monitor::discovery::alloc`), after the function copied an argument to another register
/// and reused its own: the attach cookie then says where each argument is. Bits `4n..4n+4`
/// of the cookie hold the location of the `n`-th System V argument (rdi, rsi, rdx, rcx, r8,
/// r9): [`arg_location::OWN`] for its own register, else a register code below.
pub mod arg_location {
    /// The argument is still in its own register (a cookie of 0 moves nothing).
    pub const OWN: u8 = 0;
    pub const RDI: u8 = 1;
    pub const RSI: u8 = 2;
    pub const RDX: u8 = 3;
    pub const RCX: u8 = 4;
    pub const R8: u8 = 5;
    pub const R9: u8 = 6;
    pub const RAX: u8 = 7;
    pub const RBX: u8 = 8;
    pub const R10: u8 = 9;
    pub const R11: u8 = 10;
    pub const R12: u8 = 11;
    pub const R13: u8 = 12;
    pub const R14: u8 = 13;
    pub const R15: u8 = 14;

    /// Register names by code, for logs and `inspect`.
    pub const NAMES: [&str; 15] = [
        "own", "rdi", "rsi", "rdx", "rcx", "r8", "r9", "rax", "rbx", "r10", "r11", "r12", "r13",
        "r14", "r15",
    ];

    /// The location code of argument `position` in `cookie`.
    #[inline(always)]
    pub const fn of(cookie: u64, position: usize) -> u8 {
        ((cookie >> (4 * (position & 0xf))) & 0xf) as u8
    }

    /// `cookie` with argument `position` found in register `code`.
    pub const fn with(cookie: u64, position: usize, code: u8) -> u64 {
        let shift = 4 * position;
        (cookie & !(0xf << shift)) | (((code & 0xf) as u64) << shift)
    }
}

#[cfg(test)]
mod tests {
    use super::arg_location;

    #[test]
    fn argument_locations_round_trip() {
        let cookie = arg_location::with(0, 0, arg_location::RSI);
        let cookie = arg_location::with(cookie, 2, arg_location::R15);
        assert_eq!(arg_location::of(cookie, 0), arg_location::RSI);
        assert_eq!(arg_location::of(cookie, 1), arg_location::OWN);
        assert_eq!(arg_location::of(cookie, 2), arg_location::R15);
        assert_eq!(arg_location::of(0, 5), arg_location::OWN);
        let cleared = arg_location::with(cookie, 0, arg_location::OWN);
        assert_eq!(arg_location::of(cleared, 0), arg_location::OWN);
        assert_eq!(arg_location::of(cleared, 2), arg_location::R15);
    }
}

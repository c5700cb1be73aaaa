//! Heap probes: allocator entry points and returns, per watched process.
//!
//! Map roles follow bcc's memleak: the requested size (and the return address and stack
//! pointer at entry) is stashed per *thread* between an allocation's entry and its return
//! (in the thread's task storage); outstanding blocks are kept as `(pid, addr) → {size,
//! stack hash, task id}`; a free deletes its block and reports it (under aggregation it
//! may leave the entry as a tombstone for the next block at the address, see
//! `monitor_common::heap::BLOCK_FREED`), a free of a block never seen allocated (made before
//! attach) only bumps a per-process counter.
//!
//! The callsite comes from unwinding the user stack in the return probe, starting in the
//! allocator's caller (the return address and stack pointer stashed at entry), with the
//! target's `.eh_frame` rules, compiled by userspace into `UNWIND_ROWS` and indexed by
//! `UNWIND_BUCKETS` (release binaries have no frame pointers); the walk ends at the first
//! frame in callsite code. The tokio task the thread is polling comes from tokio's
//! thread-local current-task slot, at the offset discovery read from the target's code.

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::BPF_ANY;
use aya_ebpf::helpers::{
    bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_current_task,
    bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
    bpf_probe_read_user, bpf_task_storage_get,
};
use aya_ebpf::macros::{btf_map, map, uprobe, uretprobe};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{ProbeContext, RetProbeContext};
use monitor_common::HEAP_RINGBUF_BYTES;
use monitor_common::heap::{
    BLOCK_FREED, BlockInfo, BlockKey, HeapEvent, HeapEventKind, HeapTarget, OUTSTANDING_MAX,
    arg_location, group_task, heap_counter, sampled,
};
use monitor_common::unwind::{self, MAX_FRAMES, Regs, UnwindRow};

use crate::{heap_groups, stream};

#[map]
static HEAP_EVENTS: RingBuf = RingBuf::with_byte_size(HEAP_RINGBUF_BYTES, 0);

#[map]
static HEAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(heap_counter::COUNT, 0);

#[map]
static HEAP_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Watched processes and their settings, by pid.
#[map]
static HEAP_TARGETS: HashMap<u32, HeapTarget> = HashMap::with_max_entries(1024, 0);

/// Rows of every watched executable's unwind table; each target owns a slice.
#[map]
static UNWIND_ROWS: Array<UnwindRow> =
    Array::with_max_entries(monitor_common::heap::UNWIND_ROWS_MAX, 0);

/// Bucket indexes of the unwind tables (see `unwind::find_row_bucketed`); each target owns a
/// slice.
#[map]
static UNWIND_BUCKETS: Array<u32> =
    Array::with_max_entries(monitor_common::heap::UNWIND_BUCKETS_MAX, 0);

/// What an allocation's entry learned, until its return: by thread (pid_tgid).
#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    size: u64,
    /// Block being resized (realloc) or 0.
    old_addr: u64,
    /// Where posix_memalign will store the block's address, or 0 (then: the return value).
    out_ptr: u64,
    /// The allocator's return address and the stack pointer at its entry, read at entry
    /// (where `[rsp]` is the return address): a return probe's own `ip` can be the uretprobe
    /// trampoline instead, as was seen on threads other than tokio's workers.
    return_address: u64,
    entry_rsp: u64,
    /// Entries seen nested in this stash's call (see `NESTED_MAX`).
    nested: u64,
    /// 1 from the entry until its return consumes the stash; 0 otherwise (a new storage
    /// starts zeroed).
    live: u64,
    /// The thread's `fsbase` (its thread pointer), once read (0: not yet): it is set when
    /// the thread starts and the programs leakscope watches never move it, so it is read from
    /// the kernel's `task_struct` once per thread, not at every allocation (a kernel read is
    /// about 0.1 µs here). An exec, which gives the thread a new one, clears the storage
    /// (`forget_thread`).
    fsbase: u64,
    /// The task whose spawn vtable (`heap_groups::task_site`) the thread found last, and
    /// that vtable (task id 0: none yet): a thread polls one task for many allocations in a
    /// row, and a task's vtable, once known, does not change (its spawn, which writes it,
    /// comes before its polls), so the lookup is made once per run of the task.
    site_task_id: u64,
    site: u64,
}

/// An allocator entry on a thread whose stash is live, deeper on its stack, is a call nested
/// inside the stashed one (musl's `calloc` calls `malloc`, `posix_memalign` calls
/// `aligned_alloc`): the outer call is the one the program made. A call nests at most a
/// couple of others, so after this many the stash is taken for one whose return was never
/// seen, and no longer shadows later calls. (A bound by count, not by time: reading the
/// clock at every entry cost 50 ns, measured.)
const NESTED_MAX: u64 = 8;

/// A BPF task storage map (`BPF_MAP_TYPE_TASK_STORAGE`) in the layout of aya-ebpf's BTF map
/// definitions, which have no task storage type of their own: each thread's `Pending` lives
/// next to its `task_struct`, found without hashing, and freed with the thread. Entry and
/// return update it in place (a hash map took an insert at each entry and a delete at each
/// return, each a locked helper call: 0.29 µs a pair, measured).
#[repr(C)]
pub(crate) struct TaskStorage<T> {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    // Local storage maps have no capacity and are never preallocated.
    max_entries: *const [i32; 0],
    map_flags: *const [i32; aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers the loader reads from BTF; never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub(crate) const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The current thread's value; with `create`, made (zeroed) if it has none yet. Null if
    /// it has none (or could not be made).
    #[inline(always)]
    fn current(&self, create: bool) -> *mut T {
        let flags = if create {
            u64::from(aya_ebpf::bindings::BPF_LOCAL_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        // SAFETY: the helper takes the map and the current task (a trusted BTF pointer) and
        // returns the value or null.
        unsafe {
            bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                bpf_get_current_task_btf(),
                core::ptr::null_mut(),
                flags,
            )
        }
        .cast()
    }
}

#[btf_map]
static PENDING: TaskStorage<Pending> = TaskStorage::new();

/// Preallocated (about 20 MiB): allocating entries on insert made each free 0.2 µs dearer
/// (measured).
#[map]
pub(crate) static OUTSTANDING: HashMap<BlockKey, BlockInfo> =
    HashMap::with_max_entries(OUTSTANDING_MAX, 0);

/// Frees of blocks allocated before attach (or not tracked), by pid.
#[map]
static UNTRACKED_FREES: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);

#[inline(always)]
pub(crate) fn bump(index: u32) {
    stream::bump(&HEAP_COUNTERS, index);
}

#[inline(always)]
pub(crate) fn submit_flags() -> u64 {
    stream::submit_flags(&HEAP_EVENTS)
}

fn pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

pub(crate) fn target(pid: u32) -> Option<HeapTarget> {
    // SAFETY: the value is copied out before the map can change.
    unsafe { HEAP_TARGETS.get(&pid) }.copied()
}

/// Argument `position` of the probed function, from the register the attach cookie names
/// (see `arg_location`): an entry probe past the function's first instructions may find it
/// moved.
#[inline(always)]
fn arg(ctx: &ProbeContext, cookie: u64, position: usize) -> u64 {
    // SAFETY: `regs` is the probe's register context for the program's duration.
    let regs = unsafe { &*ctx.regs };
    match arg_location::of(cookie, position) {
        arg_location::OWN => ctx.arg::<u64>(position).unwrap_or(0),
        arg_location::RDI => regs.rdi,
        arg_location::RSI => regs.rsi,
        arg_location::RDX => regs.rdx,
        arg_location::RCX => regs.rcx,
        arg_location::R8 => regs.r8,
        arg_location::R9 => regs.r9,
        arg_location::RAX => regs.rax,
        arg_location::RBX => regs.rbx,
        arg_location::R10 => regs.r10,
        arg_location::R11 => regs.r11,
        arg_location::R12 => regs.r12,
        arg_location::R13 => regs.r13,
        arg_location::R14 => regs.r14,
        arg_location::R15 => regs.r15,
        _ => 0,
    }
}

fn cookie(ctx: &ProbeContext) -> u64 {
    // SAFETY: the helper only reads the cookie of the link that fired.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn stash(ctx: &ProbeContext, size: u64, old_addr: u64, out_ptr: u64) -> u32 {
    if target(pid()).is_none() {
        return 0;
    }
    // SAFETY: `regs` is the probe's register context; the entry probes sit before anything
    // that moves rsp (see discovery::alloc), so `[rsp]` is the return address.
    let entry_rsp = unsafe { (*ctx.regs).rsp };
    let stash = PENDING.current(true);
    if stash.is_null() {
        bump(heap_counter::PENDING_FULL);
        return 0;
    }
    // SAFETY: this thread's own storage: only its probes touch it, one at a time.
    let stash = unsafe { &mut *stash };
    if stash.live != 0 && stash.entry_rsp > entry_rsp && stash.nested < NESTED_MAX {
        stash.nested += 1;
        return 0;
    }
    // SAFETY: checked read of the target's stack.
    let return_address = unsafe { bpf_probe_read_user(entry_rsp as *const u64) }.unwrap_or(0);
    stash.size = size;
    stash.old_addr = old_addr;
    stash.out_ptr = out_ptr;
    stash.return_address = return_address;
    stash.entry_rsp = entry_rsp;
    stash.nested = 0;
    stash.live = 1;
    0
}

/// `__rust_alloc(size, align)`, `__rust_alloc_zeroed`, `malloc(size)`, `valloc`, `pvalloc`.
#[uprobe]
pub fn heap_alloc_entry(ctx: ProbeContext) -> u32 {
    let cookie = cookie(&ctx);
    stash(&ctx, arg(&ctx, cookie, 0), 0, 0)
}

/// `calloc(n, size)`.
#[uprobe]
pub fn heap_calloc_entry(ctx: ProbeContext) -> u32 {
    let cookie = cookie(&ctx);
    let n = arg(&ctx, cookie, 0);
    let size = arg(&ctx, cookie, 1);
    // An overflowing product makes calloc fail, and a failed allocation is not recorded.
    stash(&ctx, n.wrapping_mul(size), 0, 0)
}

/// `aligned_alloc(align, size)`, `memalign(align, size)`.
#[uprobe]
pub fn heap_aligned_entry(ctx: ProbeContext) -> u32 {
    let cookie = cookie(&ctx);
    stash(&ctx, arg(&ctx, cookie, 1), 0, 0)
}

/// `posix_memalign(&out, align, size)`.
#[uprobe]
pub fn heap_posix_memalign_entry(ctx: ProbeContext) -> u32 {
    let cookie = cookie(&ctx);
    stash(&ctx, arg(&ctx, cookie, 2), 0, arg(&ctx, cookie, 0))
}

/// `realloc(ptr, size)`.
#[uprobe]
pub fn heap_realloc_entry(ctx: ProbeContext) -> u32 {
    let cookie = cookie(&ctx);
    stash(&ctx, arg(&ctx, cookie, 1), arg(&ctx, cookie, 0), 0)
}

/// `__rust_realloc(ptr, old_size, align, new_size)`.
#[uprobe]
pub fn heap_rust_realloc_entry(ctx: ProbeContext) -> u32 {
    let cookie = cookie(&ctx);
    stash(&ctx, arg(&ctx, cookie, 3), arg(&ctx, cookie, 0), 0)
}

/// `free(ptr)`, `__rust_dealloc(ptr, size, align)`, `_rjem_sdallocx(ptr, ...)`, `mi_free`.
#[uprobe]
pub fn heap_free_entry(ctx: ProbeContext) -> u32 {
    let pid = pid();
    let addr = arg(&ctx, cookie(&ctx), 0);
    if let Some(target) = target(pid)
        && sampled(addr, target.sample_shift)
    {
        free_block(pid, addr);
    }
    0
}

/// Return of every allocating function: the block's address is the return value (or, for
/// posix_memalign, what it stored).
#[uretprobe]
pub fn heap_alloc_return(ctx: RetProbeContext) -> u32 {
    let stash = PENDING.current(false);
    if stash.is_null() {
        return 0;
    }
    // SAFETY: this thread's own storage, as in `stash`.
    let stash = unsafe { &mut *stash };
    // SAFETY: the probe's register context. A call nested in the stashed one returns
    // deeper on the stack than the stashed call's entry: leave the stash to the outer call.
    if stash.live == 0 || unsafe { (*ctx.regs).rsp } <= stash.entry_rsp {
        return 0;
    }
    stash.live = 0;
    let pending = stash;
    let pid = pid();
    let Some(target) = target(pid) else {
        return 0;
    };
    let returned: u64 = ctx.ret();
    let addr = if pending.out_ptr != 0 {
        if returned != 0 {
            return 0; // posix_memalign failed: nothing allocated
        }
        // SAFETY: reading the target's memory through the checked helper.
        unsafe { bpf_probe_read_user(pending.out_ptr as *const u64) }.unwrap_or(0)
    } else {
        returned
    };
    if pending.old_addr != 0
        && (addr != 0 || pending.size == 0)
        && sampled(pending.old_addr, target.sample_shift)
    {
        // A successful realloc (or realloc(p, 0)) released the old block.
        free_block(pid, pending.old_addr);
    }
    if addr == 0 || !sampled(addr, target.sample_shift) {
        return 0;
    }
    record_alloc(&ctx, pid, &target, addr, pending);
    0
}

fn free_block(pid: u32, addr: u64) {
    if addr == 0 {
        return;
    }
    let key = BlockKey { addr, pid, _pad: 0 };
    let block = OUTSTANDING
        .get_ptr_mut(&key)
        // SAFETY: a live map value.
        .filter(|block| unsafe { (**block).aggregated } != BLOCK_FREED);
    let Some(block) = block else {
        match UNTRACKED_FREES.get_ptr_mut(&pid) {
            // SAFETY: a counter only this pid's probes touch; a lost race loses one count.
            Some(count) => unsafe { *count += 1 },
            None => {
                let _ = UNTRACKED_FREES.insert(&pid, &1, u64::from(BPF_ANY));
            }
        }
        return;
    };
    // SAFETY: a live map value, copied before it changes.
    let info = unsafe { *block };
    if info.aggregated != 0 {
        if heap_groups::leave_tombstone() {
            // SAFETY: as above.
            unsafe { (*block).aggregated = BLOCK_FREED };
        } else {
            let _ = OUTSTANDING.remove(&key);
        }
        heap_groups::release(pid, &info);
        return;
    }
    let _ = OUTSTANDING.remove(&key);
    if let Some(entry) = reserve(HeapEventKind::Free, pid, addr, &info) {
        entry.submit(submit_flags());
    }
}

/// An exec replaces the thread's program: what its storage remembers (a stash whose return
/// will never come, its `fsbase`) is of the old one.
#[inline(always)]
pub(crate) fn forget_thread() {
    let stash = PENDING.current(false);
    if !stash.is_null() {
        // SAFETY: the current thread's own storage.
        unsafe { *stash = core::mem::zeroed() };
    }
}

/// The id of the tokio task the thread is polling (0: none or unknown), from tokio's
/// thread-local slot; `stash` is the thread's storage, which keeps its `fsbase`.
fn current_task_id(target: &HeapTarget, stash: &mut Pending) -> u64 {
    if target.task_slot_fs_offset == 0 || target.fsbase_offset == 0 {
        return 0;
    }
    // SAFETY: reads through the checked helpers; a bad address yields an error, not a fault.
    unsafe {
        if stash.fsbase == 0 {
            let task = bpf_get_current_task();
            let Ok(fsbase) = bpf_probe_read_kernel((task + target.fsbase_offset) as *const u64)
            else {
                return 0;
            };
            stash.fsbase = fsbase;
        }
        let slot = stash.fsbase.wrapping_add(target.task_slot_fs_offset as u64);
        bpf_probe_read_user(slot as *const u64).unwrap_or(0)
    }
}

/// Reserves an event and fills everything but the stack. The event is written in place:
/// a `HeapEvent` on the BPF stack would not fit next to the unwinder's state (512 bytes).
pub(crate) fn reserve(
    kind: HeapEventKind,
    pid: u32,
    addr: u64,
    info: &BlockInfo,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<HeapEvent>> {
    let seq = stream::next_seq(&HEAP_SEQ);
    let Some(mut entry) = HEAP_EVENTS.reserve::<HeapEvent>(0) else {
        bump(heap_counter::RINGBUF_FULL);
        return None;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at the reserved, exclusively owned ring-buffer record.
    unsafe {
        (*event).ktime_ns = bpf_ktime_get_ns();
        (*event).seq = seq;
        (*event).addr = addr;
        (*event).size = info.size;
        (*event).stack_hash = info.stack_hash;
        (*event).task_id = info.task_id;
        (*event).pid = pid;
        (*event).tid = bpf_get_current_pid_tgid() as u32;
        (*event).cpu = bpf_get_smp_processor_id();
        (*event).kind = kind as u32;
        (*event).nframes = 0;
        (*event)._pad = 0;
        (*event).first_pc = 0;
    }
    Some(entry)
}

fn record_alloc(
    ctx: &RetProbeContext,
    pid: u32,
    target: &HeapTarget,
    addr: u64,
    pending: &mut Pending,
) {
    let task_id = current_task_id(target, pending);
    if target.aggregate != 0 {
        let task = if task_id != 0 && task_id == pending.site_task_id {
            pending.site
        } else {
            let site = heap_groups::task_site(pid, task_id);
            // Only a vtable is kept: an unknown one may yet be written by the task's first
            // poll.
            if site > group_task::UNKNOWN {
                pending.site_task_id = task_id;
                pending.site = site;
            }
            site
        };
        let start = caller(ctx, pending);
        heap_groups::record_alloc(pid, target, addr, pending.size, task_id, task, &start);
        return;
    }
    let mut info = BlockInfo {
        size: pending.size,
        stack_hash: 0,
        task_id,
        group_task: 0,
        group_kind: 0,
        aggregated: 0,
    };
    let Some(mut entry) = reserve(HeapEventKind::Alloc, pid, addr, &info) else {
        return; // not tracked: its free will count as untracked, not corrupt a series
    };
    let event = entry.as_mut_ptr();
    let start = caller(ctx, pending);
    // SAFETY: the record is ours until submitted; `frames` is a plain array inside it.
    let frames = unsafe { &mut (*event).frames };
    let (unwound, hash) = unwind_stack(target, &start, frames);
    info.stack_hash = hash;
    // SAFETY: as above.
    unsafe {
        (*event).first_pc = start.pc;
        (*event).nframes = unwound as u32;
        (*event).stack_hash = hash;
    }
    let key = BlockKey { addr, pid, _pad: 0 };
    if OUTSTANDING.insert(&key, &info, u64::from(BPF_ANY)).is_err() {
        bump(heap_counter::OUTSTANDING_FULL);
        entry.discard(0);
        return;
    }
    entry.submit(submit_flags());
}

/// The allocator's caller's registers just after the allocator returned: at the return
/// address, the return address popped; rbp is callee-saved, so the probe's value is the
/// caller's.
#[inline(always)]
fn caller(ctx: &RetProbeContext, pending: &Pending) -> Regs {
    // SAFETY: `regs` is the probe's register context for the program's duration.
    let regs = unsafe { &*ctx.regs };
    Regs {
        pc: pending.return_address,
        rsp: pending.entry_rsp.wrapping_add(8),
        rbp: regs.rbp,
    }
}

/// Walks the stack from `start` into `frames` with the target's unwind table; returns how
/// many frames were written and the stack's hash (over `start.pc` and those frames).
#[inline(always)]
pub(crate) fn unwind_stack(
    target: &HeapTarget,
    start: &Regs,
    frames: &mut [u64; MAX_FRAMES],
) -> (usize, u64) {
    let first = target.unwind_first;
    let rows = target.unwind_rows;
    let bucket_first = target.bucket_first;
    let unwound = unwind::unwind(
        start,
        target.load_bias,
        MAX_FRAMES,
        |pc| {
            unwind::find_row_bucketed(
                target.text_start,
                target.buckets,
                |b| UNWIND_BUCKETS.get(bucket_first + b).copied(),
                |i| {
                    if i >= rows {
                        return None;
                    }
                    UNWIND_ROWS.get(first + i).copied()
                },
                pc,
            )
        },
        // SAFETY: reading the target's stack through the checked helper.
        |at| unsafe { bpf_probe_read_user(at as *const u64) }.ok(),
        frames,
    );
    let mut hash: u64 = (0xcbf2_9ce4_8422_2325 ^ start.pc).wrapping_mul(0x0100_0000_01b3);
    for i in 0..MAX_FRAMES {
        if i >= unwound {
            break;
        }
        if let Some(&pc) = frames.get(i) {
            hash = (hash ^ pc).wrapping_mul(0x0100_0000_01b3);
        }
    }
    (unwound, hash)
}

//! Heap aggregation in the kernel: for a process whose `HeapTarget::aggregate` is set, the
//! probes keep each group's running counts (`HEAP_GROUPS`, keyed by process, stack and the
//! allocating task's spawn vtable) instead of reporting every allocation and free. The
//! outstanding-block map remembers each block's group, so its free subtracts from the group
//! it was counted in. Only a group's creation is reported (`HeapEventKind::NewGroup`, with
//! its stack), so userspace can name it; it reads the counts when it wants them.
//!
//! Two ties the event path makes in userspace are made here, where both sides are exact:
//! - the allocating task's spawn site: `TASK_VTABLES` maps a task id to its vtable, written
//!   by the task hooks at spawn (or first poll);
//! - a task's cell: the block at a task's header when its spawn hook fires is that task's
//!   cell (header, scheduler, future), moved from its callsite group to the task cell group
//!   of the task's vtable. The cell is allocated before the spawn hook runs, on that thread.
//!
//! Counters are only added to, atomically: a group's live figures are `allocated -
//! released`, and no update is lost to a concurrent one on another CPU.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray};
use monitor_common::heap::{
    BLOCK_FREED, BlockInfo, BlockKey, GROUPS_MAX, GroupCounters, GroupKey, HeapEventKind,
    HeapTarget, TASK_VTABLES_MAX, TaskKey, group_kind, group_task, heap_counter, tombstones,
};
use monitor_common::unwind::{MAX_FRAMES, Regs};

use crate::heap::{self, OUTSTANDING};

/// Preallocated like `OUTSTANDING`: a group's first block then costs no allocation.
#[map]
static HEAP_GROUPS: HashMap<GroupKey, GroupCounters> = HashMap::with_max_entries(GROUPS_MAX, 0);

#[map]
static TASK_VTABLES: LruHashMap<TaskKey, u64> = LruHashMap::with_max_entries(TASK_VTABLES_MAX, 0);

/// The stack is unwound here before its group is known to be new: only a new group's
/// stack is copied into an event (the BPF stack has no room for one next to the walk).
#[map]
static HEAP_STACK_SCRATCH: PerCpuArray<[u64; MAX_FRAMES]> = PerCpuArray::with_max_entries(1, 0);

/// How many tombstones `OUTSTANDING` holds (see `monitor_common::heap::BLOCK_FREED`).
#[map]
static TOMBSTONES: Array<u64> = Array::with_max_entries(tombstones::COUNT, 0);

/// Whether a free may leave its entry as a tombstone (then counted), or must delete it (the
/// map holds its share of them, `tombstones::MAX`). Concurrent frees may each pass the
/// check, so the count can pass the bound by one per CPU at most.
#[inline(always)]
pub fn leave_tombstone() -> bool {
    let (Some(left), Some(purged), Some(max)) = (
        TOMBSTONES.get_ptr_mut(tombstones::LEFT),
        TOMBSTONES.get_ptr(tombstones::PURGED),
        TOMBSTONES.get_ptr(tombstones::MAX),
    ) else {
        return false;
    };
    // SAFETY: slots of an array map, valid while the program runs.
    if unsafe { (*left).wrapping_sub(*purged) >= *max } {
        return false;
    }
    add(left, 1);
    true
}

/// A tombstone was taken over by a new block.
#[inline(always)]
fn tombstone_reused() {
    if let Some(left) = TOMBSTONES.get_ptr_mut(tombstones::LEFT) {
        add(left, u64::MAX); // minus one
    }
}

#[inline(always)]
fn add(counter: *mut u64, value: u64) {
    // SAFETY: `counter` points into a map value, valid while the program runs; the add is
    // atomic (BPF's `lock xadd`), so a concurrent probe on another CPU loses nothing. (The
    // BPF target's `AtomicU64` has loads and stores only, hence the intrinsic.)
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, value) };
}

/// Counts one block of `size` bytes in `key`'s group, creating it if needed. `Some(true)`:
/// the group is new; `None`: the map is full (the block is not counted).
#[inline(always)]
fn allocate(key: &GroupKey, size: u64) -> Option<bool> {
    if let Some(counters) = HEAP_GROUPS.get_ptr_mut(key) {
        count_allocated(counters, size);
        return Some(false);
    }
    let first = GroupCounters {
        allocated_blocks: 1,
        allocated_bytes: size,
        released_blocks: 0,
        released_bytes: 0,
    };
    if HEAP_GROUPS
        .insert(key, &first, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return Some(true);
    }
    // Created meanwhile on another CPU, or the map is full.
    let counters = HEAP_GROUPS.get_ptr_mut(key)?;
    count_allocated(counters, size);
    Some(false)
}

#[inline(always)]
fn count_allocated(counters: *mut GroupCounters, size: u64) {
    // SAFETY: field addresses inside a live map value.
    unsafe {
        add(core::ptr::addr_of_mut!((*counters).allocated_blocks), 1);
        add(core::ptr::addr_of_mut!((*counters).allocated_bytes), size);
    }
}

/// Subtracts a block from the group it was counted in (its free, or its move to a cell).
#[inline(always)]
pub fn release(pid: u32, info: &BlockInfo) {
    let key = GroupKey {
        pid,
        kind: info.group_kind,
        site: info.stack_hash,
        task: info.group_task,
    };
    if let Some(counters) = HEAP_GROUPS.get_ptr_mut(&key) {
        // SAFETY: field addresses inside a live map value.
        unsafe {
            add(core::ptr::addr_of_mut!((*counters).released_blocks), 1);
            add(
                core::ptr::addr_of_mut!((*counters).released_bytes),
                info.size,
            );
        }
    }
}

/// The `GroupKey::task` of an allocation by task `task_id` (0: none) of process `pid`: the
/// task's spawn vtable, or a `group_task` value.
#[inline(always)]
pub fn task_site(pid: u32, task_id: u64) -> u64 {
    if task_id == 0 {
        return group_task::NONE;
    }
    // SAFETY: copied out of the map.
    unsafe {
        TASK_VTABLES.get(&TaskKey {
            task_id,
            pid,
            _pad: 0,
        })
    }
    .copied()
    .unwrap_or(group_task::UNKNOWN)
}

/// An allocation's return, for a process tracked by aggregates (`task`: see `task_site`).
#[inline(always)]
pub fn record_alloc(
    pid: u32,
    target: &HeapTarget,
    addr: u64,
    size: u64,
    task_id: u64,
    task: u64,
    start: &Regs,
) {
    let Some(scratch) = HEAP_STACK_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, ours while the program runs (uprobe programs do not migrate).
    let frames = unsafe { &mut *scratch };
    let (unwound, hash) = heap::unwind_stack(target, start, frames);
    let info = BlockInfo {
        size,
        stack_hash: hash,
        task_id,
        group_task: task,
        group_kind: group_kind::CALLSITE,
        aggregated: 1,
    };
    let block = BlockKey { addr, pid, _pad: 0 };
    // An entry at this address is most often the tombstone of the last block there, taken
    // over in place (one lookup instead of an insert); else a block whose free was not seen
    // (dropped from its group).
    if let Some(entry) = OUTSTANDING.get_ptr_mut(&block) {
        // SAFETY: a live map value; copied before it is overwritten.
        let old = unsafe { *entry };
        if old.aggregated == BLOCK_FREED {
            tombstone_reused();
        } else if old.aggregated != 0 {
            release(pid, &old);
        }
        // SAFETY: as above.
        unsafe { *entry = info };
    } else if OUTSTANDING
        .insert(&block, &info, u64::from(BPF_NOEXIST))
        .is_err()
    {
        heap::bump(heap_counter::OUTSTANDING_FULL);
        return;
    }
    let key = GroupKey {
        pid,
        kind: group_kind::CALLSITE,
        site: hash,
        task,
    };
    match allocate(&key, size) {
        Some(true) => report_group(pid, hash, start.pc, unwound, frames),
        Some(false) => {}
        None => {
            // Not counted: not tracked either, so its free is an untracked one.
            let _ = OUTSTANDING.remove(&block);
            heap::bump(heap_counter::GROUPS_FULL);
        }
    }
}

/// Tells userspace the stack of a new group (the only event an aggregated process sends).
#[inline(always)]
fn report_group(pid: u32, hash: u64, first_pc: u64, unwound: usize, frames: &[u64; MAX_FRAMES]) {
    let info = BlockInfo {
        size: 0,
        stack_hash: hash,
        task_id: 0,
        group_task: 0,
        group_kind: group_kind::CALLSITE,
        aggregated: 1,
    };
    let Some(mut entry) = heap::reserve(HeapEventKind::NewGroup, pid, 0, &info) else {
        return; // counted as a full ring: the group stays unnamed
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved record is ours until submitted.
    unsafe {
        (*event).first_pc = first_pc;
        (*event).nframes = unwound as u32;
        for i in 0..MAX_FRAMES {
            (*event).frames[i] = frames[i];
        }
    }
    entry.submit(heap::submit_flags());
}

/// A task hook saw a task start (`spawn`: its spawn; else its first poll standing in): for a
/// process tracked by aggregates, remember the task's vtable by id and move the block at its
/// header into the task cell group.
#[inline(always)]
pub fn task_started(pid: u32, header: u64, vtable: u64, task_id: u64, spawn: bool) {
    match heap::target(pid) {
        Some(target) if target.aggregate != 0 => {}
        _ => return,
    }
    if task_id != 0 {
        // A first poll never overrides what a spawn wrote.
        let flags = if spawn { BPF_ANY } else { BPF_NOEXIST };
        let _ = TASK_VTABLES.insert(
            &TaskKey {
                task_id,
                pid,
                _pad: 0,
            },
            &vtable,
            u64::from(flags),
        );
    }
    let block = BlockKey {
        addr: header,
        pid,
        _pad: 0,
    };
    let Some(info) = OUTSTANDING.get_ptr_mut(&block) else {
        return;
    };
    // SAFETY: a live map value, copied; the cell cannot be freed while its task starts.
    let old = unsafe { *info };
    // (Not a tombstone, nor a block of the event path.)
    if old.aggregated != 1 || old.group_kind != group_kind::CALLSITE {
        return;
    }
    let cell = GroupKey {
        pid,
        kind: group_kind::TASK_CELL,
        site: vtable,
        task: old.group_task,
    };
    if allocate(&cell, old.size).is_none() {
        heap::bump(heap_counter::GROUPS_FULL);
        return;
    }
    release(pid, &old);
    // SAFETY: as above.
    unsafe {
        (*info).group_kind = group_kind::TASK_CELL;
        (*info).stack_hash = vtable;
    }
}

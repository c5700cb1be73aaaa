//! leakscope's kernel side: uprobes on tokio's task lifecycle (here) and on the allocator
//! (`heap`), each with its own ring buffer, counters and sequence numbers, kept the same way
//! (`stream`).
//!
//! One program per argument register (`task_hook_rdi`, `task_hook_rsi`, ...) serves every task
//! hook point. Userspace attaches it once per function instance (per `OwnedTasks::bind_inner`,
//! per `Harness::complete`, per task type's first poll, ...) and passes, as the attach cookie,
//! what the hook means and where the vtable pointer and the task id sit. The program reads the
//! task's vtable out of the header (one vtable per spawned future type, so it names the spawn
//! site) and the task's id (so heap events, which carry the id of the task being polled, find
//! the site), and writes one fixed-size event to the task ring buffer.
//!
//! Map and program names are listed once in `monitor_common::names`; userspace checks the
//! built object against that list.
#![no_std]
#![no_main]
// `atomic_xadd` for the heap aggregates' counters (see `heap_groups::add`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod heap;
mod heap_groups;
mod stream;

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::{
    bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    bpf_probe_read_user,
};
use aya_ebpf::macros::{map, raw_tracepoint, uprobe};
use aya_ebpf::maps::{LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{ProbeContext, RawTracePointContext};
use monitor_common::{
    EXEC_RINGBUF_BYTES, ExecEvent, HookCookie, POLLED_TASKS_MAX, PolledTask, RINGBUF_BYTES,
    TaskEvent, TaskEventKind, counter,
};

#[map]
static TASK_EVENTS: RingBuf = RingBuf::with_byte_size(RINGBUF_BYTES, 0);

/// Per-CPU drop and failure counters, indexed by `monitor_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per-CPU event sequence numbers, so userspace can see gaps.
#[map]
static SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Tasks already reported by a first-poll hook, until they complete.
#[map]
static POLLED: LruHashMap<PolledTask, u8> = LruHashMap::with_max_entries(POLLED_TASKS_MAX, 0);

/// Every exec on the host, so the daemon looks at a new process at once.
#[map]
static EXEC_EVENTS: RingBuf = RingBuf::with_byte_size(EXEC_RINGBUF_BYTES, 0);

/// `sched_process_exec` fires in the new program's context, after the exec succeeded. A
/// raw tracepoint needs no tracefs. Execs are rare next to task events, so each record wakes
/// the reader (the flags 0: the kernel wakes it only when it has caught up).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(_ctx: RawTracePointContext) -> i32 {
    heap::forget_thread();
    let event = ExecEvent {
        // SAFETY: helpers without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
    };
    if EXEC_EVENTS.output::<ExecEvent>(&event, 0).is_err() {
        bump(counter::EXEC_RINGBUF_FULL);
    }
    0
}

/// One entry point per argument register that can hold the task header: the register is a
/// constant in each, because the verifier rejects a context read at a computed offset.
#[uprobe]
pub fn task_hook_rdi(ctx: ProbeContext) -> u32 {
    task_hook::<0>(&ctx)
}

#[uprobe]
pub fn task_hook_rsi(ctx: ProbeContext) -> u32 {
    task_hook::<1>(&ctx)
}

#[uprobe]
pub fn task_hook_rdx(ctx: ProbeContext) -> u32 {
    task_hook::<2>(&ctx)
}

#[uprobe]
pub fn task_hook_rcx(ctx: ProbeContext) -> u32 {
    task_hook::<3>(&ctx)
}

#[inline(always)]
fn task_hook<const ARG: usize>(ctx: &ProbeContext) -> u32 {
    if let Err(counter_index) = try_task_hook::<ARG>(ctx) {
        bump(counter_index);
    }
    0
}

fn try_task_hook<const ARG: usize>(ctx: &ProbeContext) -> Result<(), u32> {
    // SAFETY: the helper only reads the cookie of the link that fired.
    let cookie = HookCookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let header: u64 = ctx.arg(ARG).ok_or(counter::READ_FAILED)?;
    let vtable_offset = u64::from(cookie.vtable_offset);
    // SAFETY: bpf_probe_read_user copes with any address; a bad one returns an error.
    let vtable = unsafe { bpf_probe_read_user((header + vtable_offset) as *const u64) }
        .map_err(|_| counter::READ_FAILED)?;

    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let polled = PolledTask {
        header,
        pid,
        _pad: 0,
    };
    if cookie.kind == TaskEventKind::FirstPoll as u32 {
        // Only the first poll of a task is news; later polls cost just this lookup.
        if POLLED.get_ptr(&polled).is_some() {
            return Ok(());
        }
        if POLLED.insert(&polled, &1, u64::from(BPF_NOEXIST)).is_err() {
            bump(counter::POLLED_MAP_FAILED);
        }
    } else if cookie.kind == TaskEventKind::Complete as u32 {
        let _ = POLLED.remove(&polled);
    }

    // The task's id sits at `header + vtable.id_offset`; read only at spawn (or the first
    // poll standing in for it), where the userspace ledger ties it to the site.
    let task_id = if cookie.vtable_id_field != 0 && cookie.kind != TaskEventKind::Complete as u32 {
        // SAFETY: checked reads of the target's memory.
        unsafe {
            bpf_probe_read_user((vtable + u64::from(cookie.vtable_id_field)) as *const u64)
                .and_then(|id_offset| bpf_probe_read_user((header + id_offset) as *const u64))
                .unwrap_or(0)
        }
    } else {
        0
    };
    let spawn = cookie.kind == TaskEventKind::Spawn as u32;
    if spawn || cookie.kind == TaskEventKind::FirstPoll as u32 {
        heap_groups::task_started(pid, header, vtable, task_id, spawn);
    }
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let seq = stream::next_seq(&SEQ);
    let event = TaskEvent {
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        seq,
        header,
        vtable,
        pid,
        tid: pid_tgid as u32,
        cpu,
        kind: cookie.kind,
        task_id,
    };
    let mut entry = TASK_EVENTS
        .reserve::<TaskEvent>(0)
        .ok_or(counter::RINGBUF_FULL)?;
    entry.write(event);
    entry.submit(stream::submit_flags(&TASK_EVENTS));
    Ok(())
}

#[inline(always)]
fn bump(index: u32) {
    stream::bump(&COUNTERS, index);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

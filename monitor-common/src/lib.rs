//! Types shared by the eBPF programs (`monitor-ebpf`) and the daemon (`monitor`).
//!
//! Every struct here crosses the kernel/user boundary byte for byte, so each is `#[repr(C)]`,
//! has no implicit padding, and carries a size assertion: a field added on one side only
//! fails the build instead of corrupting events.
#![no_std]

/// What happened to a task. Values are stable: they are written by BPF and read by userspace.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskEventKind {
    /// The task was bound to its scheduler's owned-task list (or handed to the blocking pool).
    Spawn = 1,
    /// Its future finished or was cancelled (`Harness::complete`).
    Complete = 2,
    /// First poll of a task, for task types whose spawn path was inlined beyond reach (no
    /// `bind_inner`): the BPF side emits it once per task (until the task completes), and
    /// userspace counts it as the spawn.
    FirstPoll = 3,
}

impl TaskEventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Spawn),
            2 => Some(Self::Complete),
            3 => Some(Self::FirstPoll),
            _ => None,
        }
    }
}

/// One task lifecycle event, as written into the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the probe fired.
    pub ktime_ns: u64,
    /// Per-CPU sequence number: a gap on one CPU means events were lost there.
    pub seq: u64,
    /// Address of the task header (= the task's heap allocation).
    pub header: u64,
    /// The task's vtable pointer read from the header: one vtable per spawned future type.
    pub vtable: u64,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU whose sequence counter `seq` belongs to.
    pub cpu: u32,
    /// A [`TaskEventKind`] value.
    pub kind: u32,
    /// tokio's task `Id` (0 if it could not be read): heap probes see the id of the task
    /// being polled, and this ties it to the task's spawn site.
    pub task_id: u64,
}

const _: () = assert!(core::mem::size_of::<TaskEvent>() == 56);

/// Key of the BPF map that remembers which tasks were already polled once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolledTask {
    pub header: u64,
    pub pid: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PolledTask>() == 16);

/// Capacity of the polled-tasks map (LRU: an evicted live task that polls again is emitted
/// again, which userspace recognises as the same task).
pub const POLLED_TASKS_MAX: u32 = 1 << 18;

/// What one attach point means, passed to the BPF program as the uprobe's attach cookie so
/// one program serves every hook point of every target, whatever its tokio version:
/// bits 0..8 = the [`TaskEventKind`] to emit, bits 16..32 = the offset of the vtable pointer
/// inside the task header, as read from the target binary, bits 32..48 = where the vtable
/// record keeps the task id's offset (0: no id is read). (Which register holds the header
/// is chosen by attaching the program for that register, see `names::program::TASK_HOOKS`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookCookie {
    pub kind: u32,
    pub vtable_offset: u32,
    /// Where in the vtable record its `id_offset` field sits (0: do not read the id).
    pub vtable_id_field: u32,
}

impl HookCookie {
    pub const fn encode(self) -> u64 {
        (self.kind as u64 & 0xff)
            | ((self.vtable_offset as u64 & 0xffff) << 16)
            | ((self.vtable_id_field as u64 & 0xffff) << 32)
    }

    pub const fn decode(cookie: u64) -> Self {
        Self {
            kind: (cookie & 0xff) as u32,
            vtable_offset: ((cookie >> 16) & 0xffff) as u32,
            vtable_id_field: ((cookie >> 32) & 0xffff) as u32,
        }
    }
}

pub mod heap;
pub mod names;
pub mod unwind;

/// Indexes into the per-CPU `COUNTERS` map.
pub mod counter {
    /// Events that could not be written because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// Probes that fired but could not read the task header from user memory.
    pub const READ_FAILED: u32 = 1;
    /// First polls that could not be remembered (map update failed).
    pub const POLLED_MAP_FAILED: u32 = 2;
    /// Execs that could not be reported because the exec ring buffer was full (the
    /// daemon's periodic scan still finds those processes, a second later).
    pub const EXEC_RINGBUF_FULL: u32 = 3;
    /// Number of counters.
    pub const COUNT: u32 = 4;
}

/// A process replaced its program (`execve`): written by the `sched_process_exec` raw
/// tracepoint so the daemon can look at a new process at once, not at its next scan.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the exec.
    pub ktime_ns: u64,
    /// Process id (tgid) that exec'd.
    pub pid: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<ExecEvent>() == 16);

/// Exec ring buffer size in bytes: 4096 execs between two reads.
pub const EXEC_RINGBUF_BYTES: u32 = 1 << 16;

/// Submit flags for ring-buffer records. Waking the reader on every record costs ~5 µs in
/// the probed thread (measured: it dominated the heap probes), so records are submitted
/// without a wakeup until this much data is waiting; the reader also drains on a short
/// timer, which bounds the delay of a quiet stream.
pub const RINGBUF_WAKEUP_BYTES: u64 = 64 * 1024;
/// `BPF_RB_NO_WAKEUP`.
pub const RB_NO_WAKEUP: u64 = 1;
/// `BPF_RB_FORCE_WAKEUP`.
pub const RB_FORCE_WAKEUP: u64 = 2;
/// `BPF_RB_AVAIL_DATA` (for `bpf_ringbuf_query`).
pub const RB_AVAIL_DATA: u64 = 0;

/// Task ring buffer size in bytes (a power of two multiple of the page size).
pub const RINGBUF_BYTES: u32 = 1 << 22;
/// Heap ring buffer size in bytes with an event per allocation and free
/// (`--heap-path events`): heap events are larger and far more frequent than task events.
pub const HEAP_RINGBUF_BYTES: u32 = 1 << 24;
/// Heap ring buffer size in bytes with in-kernel aggregation (the default path), where the
/// only heap event is a new group's stack: a few hundred at a service's start, then rare.
/// The daemon maps a ring twice (for reads across its end), and the mapping counts in its
/// resident memory whether written or not: 16 MiB here was 32 MiB of RSS.
pub const HEAP_GROUP_RINGBUF_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no padding (asserted above).
    unsafe impl aya::Pod for super::TaskEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExecEvent {}
    // SAFETY: as above (asserted in `heap`).
    unsafe impl aya::Pod for super::heap::HeapEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::heap::BlockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::heap::BlockInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::heap::HeapTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::heap::GroupKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::heap::GroupCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::heap::TaskKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_round_trips() {
        let cookie = HookCookie {
            kind: TaskEventKind::Complete as u32,
            vtable_offset: 16,
            vtable_id_field: 72,
        };
        assert_eq!(HookCookie::decode(cookie.encode()), cookie);
    }
}

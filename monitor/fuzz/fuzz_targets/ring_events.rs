//! The ring-buffer record decoders and what the drain loop does with each record: task
//! events into the task ledger, heap events into the heap ledger, spawns claiming their
//! task cells, then what the exports read back. The values come from the probed process's
//! memory, so any of them can be anything.
//!
//! Input: records, each a kind byte (even: task, odd: heap; bit 1 set: the watched
//! process's pid), a length (2 bytes, little-endian; cut to what is left) and its bytes.
#![no_main]

use std::path::PathBuf;
use std::sync::Arc;

use leakscope::bpf::ring::decode;
use leakscope::discovery::symbolize::Symbolizer;
use leakscope::discovery::{TargetImage, TaskVtable};
use leakscope::state::attribution::claim_task_cells;
use leakscope::state::heap::{HeapLedger, ProcessHeap};
use leakscope::state::tasks::{ProcessTasks, TaskLedger};
use libfuzzer_sys::fuzz_target;
use monitor_common::heap::HeapEvent;
use monitor_common::{TaskEvent, TaskEventKind};

const PID: u32 = 4242;

fn image() -> TargetImage {
    let vtable = |vaddr: u64, site: &str| TaskVtable {
        vaddr,
        site: site.to_string(),
        complete_hooked: true,
        ..TaskVtable::default()
    };
    TargetImage {
        path: PathBuf::from("/fuzz/app"),
        vtables: vec![vtable(0x1000, "app::a"), vtable(0x2000, "app::b")],
        ..TargetImage::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut tasks = TaskLedger::new();
    tasks.add_process(ProcessTasks::new(PID, "app".into(), Arc::new(image()), 0));
    let mut heap = HeapLedger::default();
    heap.add_process(ProcessHeap::new(
        PID,
        "app".into(),
        0,
        Arc::new(Symbolizer::default()),
        1,
    ));
    let mut rest = data;
    while let [kind, l0, l1, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(tail.len());
        let (record, next) = tail.split_at(len);
        rest = next;
        let ours = kind & 2 != 0;
        if kind % 2 == 0 {
            let Some(mut event) = decode::<TaskEvent>(record) else {
                tasks.stream.ignore(1);
                continue;
            };
            if ours {
                event.pid = PID;
            }
            tasks.apply(&event);
            if matches!(
                TaskEventKind::from_u32(event.kind),
                Some(TaskEventKind::Spawn | TaskEventKind::FirstPoll)
            ) {
                claim_task_cells(&tasks, &mut heap, &[(event.pid, event.header)]);
            }
        } else {
            let Some(mut event) = decode::<HeapEvent>(record) else {
                heap.stream.ignore(1);
                continue;
            };
            if ours {
                event.pid = PID;
            }
            heap.apply(&event, &tasks);
        }
    }
    // What the exports and the expiry of held events read back, at both ends of time.
    for now in [0, u64::MAX] {
        let _ = tasks.snapshot(now);
        tasks.expire_pending(now, |pid| pid % 2 == 0);
    }
    for process in heap.processes() {
        let _ = process.snapshot();
        let _ = process.scaled_totals();
    }
});

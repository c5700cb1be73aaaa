//! The tokio-lines fixture, built against tokio 1.8, 1.10, 1.18, 1.22, 1.25 and 1.28: each line's task
//! layout is learned from the binary, and it is what tokio's source at that tag declares
//! (`runtime/task/raw.rs` `Vtable`, `runtime/task/core.rs` `Header`).

use super::*;

/// (line, vtable entries, offsets after them, vtable pointer's offset in the header).
const LINES: [(&str, &[&str], bool, u64); 6] = [
    (
        "1-8-0",
        &[
            "poll",
            "dealloc",
            "try_read_output",
            "drop_join_handle_slow",
            "shutdown",
        ],
        false,
        // state, owned-list `Pointers` (two words), queue_next, stack_next, then the vtable.
        40,
    ),
    (
        "1-10-0",
        &[
            "poll",
            "dealloc",
            "try_read_output",
            "drop_join_handle_slow",
            "remote_abort",
            "shutdown",
        ],
        false,
        // state, owned-list `Pointers` (two words), queue_next, then the vtable.
        32,
    ),
    (
        "1-18-0",
        &[
            "poll",
            "dealloc",
            "try_read_output",
            "try_set_join_waker",
            "drop_join_handle_slow",
            "drop_abort_handle",
            "remote_abort",
            "shutdown",
        ],
        false,
        32,
    ),
    (
        "1-22-0",
        &[
            "poll",
            "dealloc",
            "try_read_output",
            "try_set_join_waker",
            "drop_join_handle_slow",
            "drop_abort_handle",
            "remote_abort",
            "shutdown",
        ],
        // A trailer offset only: no id offset to read.
        false,
        // The owned list moved out of the header in 1.21.
        16,
    ),
    (
        "1-25-0",
        &[
            "poll",
            "schedule",
            "dealloc",
            "try_read_output",
            "drop_join_handle_slow",
            "drop_abort_handle",
            "shutdown",
        ],
        true,
        // state, queue_next, then the vtable: the owned list moved out of the header.
        16,
    ),
    (
        "1-28-0",
        &[
            "poll",
            "schedule",
            "dealloc",
            "try_read_output",
            "drop_join_handle_slow",
            "drop_abort_handle",
            "shutdown",
        ],
        true,
        16,
    ),
];

#[test]
fn each_lines_task_layout_is_learned_from_the_binary() {
    for (line, entries, offsets, vtable_offset) in LINES {
        let t = analyzed(&release_fixture(&format!("tokio-lines-{line}")));
        let layout = &t.layout;
        assert!(layout.from_binary && layout.vtable.from_binary, "{line}");
        assert_eq!(layout.vtable.entries, entries, "{line}");
        assert_eq!(layout.vtable.offsets, offsets, "{line}");
        assert_eq!(layout.vtable_offset, vtable_offset, "{line}");
        // Only lines without id offsets say so.
        let says = t
            .warnings
            .iter()
            .any(|w| w.contains("carries no id offset"));
        assert_eq!(says, !offsets, "{line}: {:?}", t.warnings);
    }
}

#[test]
fn each_lines_spawn_sites_are_found_and_named_per_runtime_flavour() {
    for (line, ..) in LINES {
        let t = analyzed(&release_fixture(&format!("tokio-lines-{line}")));
        let krate = format!("tokio_lines_{}", line.replace('-', "_"));
        for (name, schedulers) in [
            (
                "leaky_multi",
                &[Scheduler::CurrentThread, Scheduler::MultiThread][..],
            ),
            (
                "leaky_current",
                &[Scheduler::CurrentThread, Scheduler::MultiThread],
            ),
            (
                "finished_multi",
                &[Scheduler::CurrentThread, Scheduler::MultiThread],
            ),
            (
                "finished_current",
                &[Scheduler::CurrentThread, Scheduler::MultiThread],
            ),
            ("spawn_blocking_work", &[Scheduler::Blocking]),
        ] {
            let site = format!("{krate}::{name}::{{{{closure}}}}");
            let mut found: Vec<Scheduler> = t
                .vtables
                .iter()
                .filter(|v| v.site == site)
                .filter_map(|v| v.scheduler)
                .collect();
            found.sort_by_key(|s| *s as u8);
            assert_eq!(found, schedulers, "{line}: {site}");
            assert!(
                t.vtables
                    .iter()
                    .filter(|v| v.site == site)
                    .all(|v| v.complete_hooked),
                "{line}: {site}"
            );
        }
    }
}

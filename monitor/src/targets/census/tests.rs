use super::memory::FakeMemory;
use super::*;
use crate::discovery::TaskVtable;

const VTABLE: u64 = 0x40_0000;
const OTHER_VTABLE: u64 = 0x40_1000;
const HANDLE: u64 = 0x9_0000;
const LISTS: u64 = 0xa_0000;
const OWNER: u64 = 3;
const SHARDS: u64 = 4;
const TRAILER: u64 = 0x100;
/// Where this picture keeps `Trailer::owned` (the waker comes first in it).
const OWNED: u64 = 16;
const COMPLETE: u64 = 0b10;

fn image() -> TargetImage {
    let vtable = |vaddr| TaskVtable {
        vaddr,
        trailer_offset: TRAILER,
        scheduler_offset: 32,
        id_offset: 40,
        ..TaskVtable::default()
    };
    TargetImage {
        vtables: vec![vtable(VTABLE), vtable(OTHER_VTABLE)],
        ..TargetImage::default()
    }
}

fn header_at(id: u64) -> u64 {
    0x10_0000 + id * 0x200
}

/// A runtime whose shards hold the tasks with these ids (shard = id & 3), each list linked
/// both ways through the trailers, the list in the second and third word of its element.
fn runtime(ids: &[u64], completed: &[u64]) -> FakeMemory {
    let mut memory = FakeMemory::default();
    memory.zeroed(HANDLE, 8192);
    // The handle: other fields, then OwnedTasks { id, list: { lists, len, count, mask } }.
    memory.put(
        HANDLE,
        &[
            1,
            1,
            7,
            OWNER,
            0,
            OWNER,
            LISTS,
            SHARDS,
            ids.len() as u64,
            SHARDS - 1,
            0,
        ],
    );
    memory.zeroed(LISTS, (SHARDS * 24) as usize);
    memory.zeroed(0x10_0000, 0x200 * 64);
    for shard in 0..SHARDS {
        let members: Vec<u64> = ids.iter().copied().filter(|id| id & 3 == shard).collect();
        for (i, &id) in members.iter().enumerate() {
            let header = header_at(id);
            let state = if completed.contains(&id) {
                COMPLETE
            } else {
                0x40
            };
            let vtable = if id % 2 == 0 { VTABLE } else { OTHER_VTABLE };
            memory.put(header, &[state, 0, vtable, OWNER, HANDLE, id]);
            let prev = i.checked_sub(1).map_or(0, |p| header_at(members[p]));
            let next = members.get(i + 1).map_or(0, |&n| header_at(n));
            // A waker (two non-null words) before `owned`.
            memory.put(header + TRAILER, &[0xdead_0000, 0xbeef_0000, prev, next]);
        }
        if let (Some(first), Some(last)) = (members.first(), members.last()) {
            memory.put(
                LISTS + shard * 24 + 8,
                &[header_at(*first), header_at(*last)],
            );
        }
    }
    memory
}

fn census_of(memory: &FakeMemory, hints: &[u64]) -> (ProcessCensus, CensusOutcome) {
    let mut census = ProcessCensus::new(&image(), 0, TOKIO);
    let outcome = census.run(
        memory,
        hints,
        || vec![(0x10_0000, 0x10_0000 + 0x200 * 64)],
        &CensusBudget::default(),
    );
    (census, outcome)
}

fn ids(outcome: &CensusOutcome) -> Vec<u64> {
    let mut ids: Vec<u64> = outcome.tasks.iter().map(|t| t.task_id).collect();
    ids.sort();
    ids
}

#[test]
fn finds_every_live_task_from_a_scan_and_learns_the_field_order() {
    let memory = runtime(&[1, 2, 3, 5, 6, 9, 13, 14], &[6]);
    let (census, outcome) = census_of(&memory, &[]);
    assert!(outcome.found);
    assert_eq!(
        ids(&outcome),
        [1, 2, 3, 5, 9, 13, 14],
        "completed task 6 is left out"
    );
    assert!((1..20).all(|id| outcome.covers(id)));
    assert_eq!(census.learned.trailer_owned, Some(OWNED));
    assert_eq!(census.learned.list_in_element, Some(8));
    assert_eq!(census.figures.last_tasks_found, 7);
    assert!(census.figures.last_nodes_read >= 8);
    assert!(census.figures.scan_bytes > 0);
    let task = outcome.tasks.iter().find(|t| t.task_id == 9).unwrap();
    assert_eq!((task.header, task.vtable), (header_at(9), OTHER_VTABLE));
}

#[test]
fn a_hook_seen_header_spares_the_scan() {
    let memory = runtime(&[1, 2, 5], &[]);
    let (census, outcome) = census_of(&memory, &[header_at(2)]);
    assert_eq!(ids(&outcome), [1, 2, 5]);
    assert_eq!(census.figures.scan_bytes, 0);
}

#[test]
fn a_list_that_changes_as_it_is_read_is_retried_then_counted_and_not_covered() {
    // Shard 1 holds 1, 5, 9; task 9's back link names a task that is not before it (the
    // list was changed between two reads, on every attempt).
    let mut memory = runtime(&[1, 2, 5, 9], &[]);
    memory.put(header_at(9) + TRAILER + OWNED, &[header_at(2)]);
    let (census, outcome) = census_of(&memory, &[]);
    assert_eq!(census.figures.retries, 3);
    assert_eq!(census.figures.links_invalid, 4);
    assert_eq!(census.figures.lists_unread, 1);
    assert!(!outcome.covers(5), "shard 1 was not read to its end");
    assert!(outcome.covers(2));
    // What validated before the broken link is kept.
    assert_eq!(ids(&outcome), [1, 2, 5]);
}

#[test]
fn no_runtime_is_found_in_memory_without_task_headers() {
    let mut memory = FakeMemory::default();
    memory.zeroed(0x10_0000, 0x200 * 64);
    let (census, outcome) = census_of(&memory, &[]);
    assert!(!outcome.found);
    assert!(outcome.tasks.is_empty());
    assert!(!outcome.covers(1));
    assert_eq!(census.figures.not_found, 1);
}

#[test]
fn the_task_bound_stops_the_census_and_says_so() {
    let memory = runtime(&[1, 5, 9, 13], &[]);
    let mut census = ProcessCensus::new(&image(), 0, TOKIO);
    let budget = CensusBudget {
        max_tasks: 2,
        ..CensusBudget::default()
    };
    let outcome = census.run(&memory, &[header_at(1)], Vec::new, &budget);
    assert_eq!(outcome.tasks.len(), 2);
    assert!(!outcome.covers(1));
    assert_eq!(census.figures.lists_unread, 1);
}

/// A runtime of tokio 1.23–1.34: one list, linked through the trailers, whose `tail` and
/// `head` (in that order) lie beside the `OwnedTasks` id in the handle, after a queue of
/// tasks to run whose two ends are tasks of the list too (not its ends).
fn single_list_runtime(ids: &[u64], completed: &[u64]) -> FakeMemory {
    let mut memory = FakeMemory::default();
    memory.zeroed(HANDLE, 8192);
    memory.zeroed(0x10_0000, 0x200 * 64);
    for (i, &id) in ids.iter().enumerate() {
        let state = if completed.contains(&id) {
            COMPLETE
        } else {
            0x40
        };
        let vtable = if id % 2 == 0 { VTABLE } else { OTHER_VTABLE };
        memory.put(header_at(id), &[state, 0, vtable, OWNER, HANDLE, id]);
        let prev = i.checked_sub(1).map_or(0, |p| header_at(ids[p]));
        let next = ids.get(i + 1).map_or(0, |&n| header_at(n));
        memory.put(
            header_at(id) + TRAILER,
            &[0xdead_0000, 0xbeef_0000, prev, next],
        );
    }
    let (first, last) = (header_at(ids[0]), header_at(ids[ids.len() - 1]));
    let (queued_a, queued_b) = (header_at(ids[1]), header_at(ids[2]));
    // Other fields, the run queue's (head, tail), then Mutex { futex, { tail, head, count,
    // closed } } and the id.
    memory.put(
        HANDLE,
        &[1, 1, 7, queued_a, queued_b, 0, last, first, 4, 0, OWNER],
    );
    memory
}

#[test]
fn a_single_list_beside_its_id_is_found_and_walked() {
    let memory = single_list_runtime(&[1, 2, 3, 4, 5], &[3]);
    let (census, outcome) = census_of(&memory, &[]);
    assert!(outcome.found);
    assert_eq!(ids(&outcome), [1, 2, 4, 5], "completed task 3 is left out");
    assert!(
        (1..20).all(|id| outcome.covers(id)),
        "one list covers every id"
    );
    assert_eq!(census.figures.runtimes, 1);
    assert_eq!(census.figures.links_invalid, 0);
    assert_eq!(census.learned.trailer_owned, Some(OWNED));
}

#[test]
fn a_single_list_found_from_a_hint_is_read_again_as_it_changes() {
    let memory = single_list_runtime(&[1, 2, 3, 4], &[]);
    let mut census = ProcessCensus::new(&image(), 0, TOKIO);
    let budget = CensusBudget::default();
    let outcome = census.run(&memory, &[header_at(4)], Vec::new, &budget);
    assert_eq!(ids(&outcome), [1, 2, 3, 4]);
    // Task 4 (the tail) released: task 3 is the tail now.
    let mut memory = memory;
    memory.put(header_at(3) + TRAILER + OWNED + 8, &[0]);
    memory.put(HANDLE + 6 * 8, &[header_at(3)]);
    let outcome = census.run(&memory, &[], Vec::new, &budget);
    assert_eq!(ids(&outcome), [1, 2, 3]);
    assert_eq!(census.figures.scan_bytes, 0);
}

#[test]
fn a_binary_without_the_vtable_offsets_is_not_censused_and_says_why() {
    let image = TargetImage {
        vtables: vec![TaskVtable {
            vaddr: VTABLE,
            ..TaskVtable::default()
        }],
        ..TargetImage::default()
    };
    let mut census = ProcessCensus::new(&image, 0, TOKIO);
    assert!(
        census
            .unreadable()
            .is_some_and(|why| why.contains("tokio < 1.23"))
    );
    let outcome = census.run(
        &single_list_runtime(&[1, 2, 3], &[]),
        &[],
        || panic!("nothing is scanned"),
        &CensusBudget::default(),
    );
    assert!(!outcome.found);
    assert_eq!(census.figures.not_found, 1);
}

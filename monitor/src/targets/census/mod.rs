//! The task census: the tasks a tokio runtime owns, read from the running process's memory,
//! so tasks spawned before leakscope attached (which no hook saw) are counted too.
//!
//! Every tokio runtime keeps each of its tasks in an intrusive list, `OwnedTasks`, until the
//! task is released. The census finds those lists without DWARF, from one task header:
//! the header holds its vtable (known from discovery) and its runtime's `owner_id`; the
//! task's `Core` holds the scheduler handle (`Arc<Handle>`, at the vtable's
//! `scheduler_offset`); the handle holds the `OwnedTasks` whose `id` is that `owner_id`,
//! and next to it its list: from tokio 1.35 a `ShardedList` (a boxed slice of mutex-guarded
//! lists, its length a power of two, and `shard_mask` = length − 1), before that one
//! mutex-guarded list whose `head` and `tail` lie beside the id. Which of the two shapes a
//! process has is not looked up by version: each is tried and only the true one validates.
//! Each list is walked through the task trailers' `owned` pointers (at the vtable's
//! `trailer_offset`). Before tokio 1.23 the vtable carries no scheduler offset (nor a task
//! id), so nothing leads from a task to its runtime and the census does not run (it says
//! why).
//!
//! The first header comes from a task a hook saw, or else from a bounded scan of the
//! process's anonymous writable memory for a known vtable address at `header + 16` (a task
//! cell is 128-aligned, so one word in sixteen is looked at). A stale header (a freed task)
//! is as good as a live one here: it still leads to the runtime's handle, which lives as
//! long as the runtime, and everything after is validated.
//!
//! The process runs on while it is read; nothing is locked, stopped or written. Every link
//! is validated (the node's vtable is one of the binary's, its `owner_id` is the list's,
//! its task id falls in the shard it was found in, its back pointer names the node it was
//! reached from); a list that fails is read again a bounded number of times, and what still
//! fails is counted, never guessed. Where rustc's field order is not knowable from outside
//! (`repr(Rust)`: where a `Mutex` keeps its data, where the trailer keeps `owned`, which of
//! `prev`/`next` comes first), the candidates are few and only the true one validates on a
//! list of two or more tasks; the answer is then kept for the process.

pub mod memory;

mod locate;
mod walk;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use memory::Memory;

use crate::discovery::TargetImage;

/// Where one line of tokio versions keeps what the census follows. Offsets are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeLayout {
    /// Which tokio versions this describes.
    pub line: &'static str,
    /// `Header::vtable` (`&'static Vtable`).
    pub header_vtable: u64,
    /// `Header::owner_id` (`Option<NonZeroU64>`; 0 for a task no list owns).
    pub header_owner_id: u64,
    /// The bit of `Header::state` set once the task's future completed (`COMPLETE`).
    pub state_complete: u64,
    /// Task cells are allocated at this alignment, so a header's address is a multiple.
    pub header_align: u64,
    /// The data of an `Arc<T>` follows its two counts.
    pub arc_data: u64,
    /// How much of the scheduler's handle is searched for its `OwnedTasks`.
    pub handle_search_bytes: u64,
    /// The shapes the owned-task list has had, tried in turn; the one a process's list
    /// validates under is kept with its runtime.
    pub owned: &'static [OwnedShape],
    /// Candidate offsets of `Trailer::owned` (`Pointers { prev, next }`) in the trailer.
    pub trailer_owned: &'static [u64],
}

/// How a runtime's owned-task list is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnedShape {
    /// `OwnedTasks { list: ShardedList { lists: Box<[Mutex<LinkedList>]>, count,
    /// shard_mask, .. }, id, closed }` (tokio 1.35 on).
    Sharded {
        /// Size of one `Mutex<LinkedList>` (the lock word, then or before `head`, `tail`).
        element_size: u64,
        /// Candidate offsets of the `LinkedList` (`head`, `tail`) in an element.
        list_in_element: &'static [u64],
        /// At most this many shards (tokio: 65536).
        max_shards: u64,
        /// The slice's (pointer, length) and `shard_mask` lie within this many bytes of
        /// `id` (the whole of `OwnedTasks` is smaller).
        window: u64,
    },
    /// `OwnedTasks { inner: Mutex<{ list, closed }>, id }` with `list` a `LinkedList { head,
    /// tail }` (tokio 1.23–1.28), or a `CountedLinkedList` holding one and its count
    /// (1.29–1.34). rustc orders the fields, so `head` and `tail` are found as two adjacent
    /// words near `id` that are both task headers of the runtime, and the list walked from
    /// one must end at the other. An empty list (two null words) cannot be told from any
    /// other pair of nulls: a runtime is found under this shape only while it owns a task.
    Single {
        /// `head`, `tail` lie within this many bytes of `id` (the whole `OwnedTasks` is
        /// smaller).
        window: u64,
    },
}

impl OwnedShape {
    /// (Bytes between two lists, candidate offsets of `head`/`tail` in a list's element.)
    fn element(&self) -> (u64, &'static [u64]) {
        match *self {
            OwnedShape::Sharded {
                element_size,
                list_in_element,
                ..
            } => (element_size, list_in_element),
            OwnedShape::Single { .. } => (16, &[0]),
        }
    }
}

/// tokio 1.23 and later: the header, vtable offsets and trailer are the same from 1.23 on;
/// the owned list changed shape at 1.35 (the tests check the workspace's 1.54, the 1.47
/// LTS, and the tokio-lines builds of 1.25, 1.28 and 1.32).
pub const TOKIO: RuntimeLayout = RuntimeLayout {
    line: "tokio >= 1.23",
    header_vtable: 16,
    header_owner_id: 24,
    state_complete: 0b10,
    header_align: 128,
    arc_data: 16,
    handle_search_bytes: 4096,
    owned: &[
        OwnedShape::Sharded {
            element_size: 24,
            list_in_element: &[0, 8],
            max_shards: 1 << 16,
            window: 64,
        },
        OwnedShape::Single { window: 64 },
    ],
    trailer_owned: &[0, 16, 32],
};

/// Bounds of one census of one process.
#[derive(Debug, Clone, Copy)]
pub struct CensusBudget {
    /// Bytes of anonymous memory scanned for a first task header, at most.
    pub scan_bytes: u64,
    /// Candidate headers tried (each costs a few reads), at most.
    pub scan_candidates: usize,
    /// Tasks read, at most (beyond, the census stops and says it is incomplete).
    pub max_tasks: usize,
    /// Times a list that failed validation is read again.
    pub retries: u32,
    /// Wall time of one census, at most.
    pub time: Duration,
}

impl Default for CensusBudget {
    fn default() -> Self {
        Self {
            scan_bytes: 1 << 30,
            scan_candidates: 256,
            max_tasks: crate::state::tasks::MAX_LIVE_TASKS_PER_PROCESS,
            retries: 3,
            time: Duration::from_secs(5),
        }
    }
}

/// A task the census found in a runtime's list, not completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CensusTask {
    pub header: u64,
    /// Runtime address of its vtable.
    pub vtable: u64,
    pub task_id: u64,
}

/// What one census found.
#[derive(Debug, Clone, Default)]
pub struct CensusOutcome {
    pub tasks: Vec<CensusTask>,
    /// The runtimes' lists as read: (shard mask, which shards were read to the end).
    lists: Vec<(u64, Vec<bool>)>,
    /// At least one runtime was found.
    pub found: bool,
}

impl CensusOutcome {
    /// An outcome of one runtime with one list, read to its end or not (for tests of what
    /// uses outcomes).
    #[cfg(test)]
    pub fn of_one_list(tasks: Vec<CensusTask>, complete: bool) -> Self {
        Self {
            tasks,
            lists: vec![(0, vec![complete])],
            found: true,
        }
    }

    /// Whether the census read, to the end, every list a task with this id can be in: then
    /// a task with this id that it did not find is not in any runtime's list.
    pub fn covers(&self, task_id: u64) -> bool {
        self.found
            && self
                .lists
                .iter()
                .all(|(mask, complete)| complete[(task_id & mask) as usize])
    }
}

/// What the censuses of one process cost and could not read, for the exports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CensusFigures {
    pub runs: u64,
    /// Wall time of the last census.
    pub last_seconds: f64,
    /// Live tasks the last census found.
    pub last_tasks_found: u64,
    /// Task nodes the last census read (completed tasks and lists read again included).
    pub last_nodes_read: u64,
    /// Runtimes (owned-task lists) known in the process.
    pub runtimes: u64,
    /// Bytes of memory scanned for a first task header.
    pub scan_bytes: u64,
    /// Links that failed validation (a node not a task of this list, a back pointer that
    /// does not match, an unreadable node: the list changed as it was read).
    pub links_invalid: u64,
    /// Lists read again after a failed validation.
    pub retries: u64,
    /// Lists left incomplete once their retries were used up (or the census's bounds hit).
    pub lists_unread: u64,
    /// Censuses that found no runtime (no task header found, or none led to a valid list).
    pub not_found: u64,
}

/// The vtable facts a census needs, by runtime address.
#[derive(Debug, Clone, Copy)]
struct VtableOffsets {
    trailer: u64,
    scheduler: u64,
    id: u64,
}

/// A runtime's owned-task list, as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OwnedList {
    owner_id: u64,
    /// Address of the `[Mutex<LinkedList>]` slice and its length; for a single list, the
    /// address of its (`head`, `tail`) and 1.
    lists: u64,
    shards: u64,
    shape: OwnedShape,
}

/// Field orders learned from a process's own lists (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
struct Learned {
    list_in_element: Option<u64>,
    trailer_owned: Option<u64>,
}

/// One process's censuses: what was learned about its runtimes is kept between them.
#[derive(Debug)]
pub struct ProcessCensus {
    layout: RuntimeLayout,
    vtables: HashMap<u64, VtableOffsets>,
    runtimes: Vec<OwnedList>,
    learned: Learned,
    pub figures: CensusFigures,
}

impl ProcessCensus {
    /// For a process running `image` loaded `load_bias` from its link addresses. Blocking
    /// tasks' vtables are left out: no runtime list owns those tasks.
    pub fn new(image: &TargetImage, load_bias: u64, layout: RuntimeLayout) -> Self {
        let vtables = image
            .vtables
            .iter()
            .filter(|v| !v.blocking && v.trailer_offset != 0 && v.scheduler_offset != 0)
            .map(|v| {
                (
                    v.vaddr.wrapping_add(load_bias),
                    VtableOffsets {
                        trailer: v.trailer_offset,
                        scheduler: v.scheduler_offset,
                        id: v.id_offset,
                    },
                )
            })
            .collect();
        Self {
            layout,
            vtables,
            runtimes: Vec::new(),
            learned: Learned::default(),
            figures: CensusFigures::default(),
        }
    }

    /// Why no census of this binary can find a runtime, when none can: no vtable of its
    /// says where a task keeps its scheduler and trailer (tokio < 1.23, or vtables not
    /// found). Its censuses then scan nothing and count as not found.
    pub fn unreadable(&self) -> Option<&'static str> {
        self.vtables.is_empty().then_some(
            "no task vtable of this binary carries the trailer and scheduler offsets (tokio \
             < 1.23, or no vtable found), so no task leads to its runtime's task list",
        )
    }

    /// Reads every known runtime's tasks. When no runtime is known yet, it is looked for
    /// from `hints` (task headers the hooks saw), then by scanning `regions` (the
    /// process's anonymous writable mappings, asked for only then).
    pub fn run(
        &mut self,
        memory: &impl Memory,
        hints: &[u64],
        regions: impl FnOnce() -> Vec<(u64, u64)>,
        budget: &CensusBudget,
    ) -> CensusOutcome {
        let started = Instant::now();
        let deadline = started + budget.time;
        self.figures.runs += 1;
        if self.runtimes.is_empty() && !self.vtables.is_empty() {
            let mut finder = locate::Finder::new(self, memory, budget.scan_candidates);
            for &hint in hints {
                finder.try_header(hint);
            }
            let mut scanned = 0;
            if finder.found().is_empty() {
                scanned = finder.scan(&regions(), budget.scan_bytes, deadline);
            }
            let found = finder.into_found();
            self.figures.scan_bytes += scanned;
            self.runtimes = found.runtimes;
            if let Some(offset) = found.list_in_element {
                self.learned.list_in_element = Some(offset);
            }
        }
        self.figures.runtimes = self.runtimes.len() as u64;
        let mut outcome = CensusOutcome {
            found: !self.runtimes.is_empty(),
            ..CensusOutcome::default()
        };
        if !outcome.found {
            self.figures.not_found += 1;
        }
        let mut read = 0u64;
        for runtime in self.runtimes.clone() {
            let mut walker = walk::Walker {
                census: self,
                memory,
                runtime,
                deadline,
                max_tasks: budget.max_tasks,
                retries: budget.retries,
                read: 0,
            };
            let complete = walker.walk_all(&mut outcome.tasks);
            read += walker.read;
            outcome.lists.push((runtime.shards - 1, complete));
        }
        self.figures.last_nodes_read = read;
        self.figures.last_tasks_found = outcome.tasks.len() as u64;
        self.figures.last_seconds = started.elapsed().as_secs_f64();
        outcome
    }
}

#[cfg(test)]
mod tests;

/// The anonymous writable mappings of process `pid` (where its heap allocations, and so its
/// task cells, live), as (start, end); empty when its maps cannot be read.
pub fn anonymous_regions(pid: u32) -> Vec<(u64, u64)> {
    let Ok(maps) = super::procfs::read_maps(pid) else {
        return Vec::new();
    };
    super::maps::parse(&maps)
        .filter(|m| m.perms.starts_with("rw") && m.path.is_none() && m.inode == 0)
        .map(|m| (m.start, m.end))
        .collect()
}

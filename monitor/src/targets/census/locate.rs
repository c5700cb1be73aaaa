//! Finding a runtime's owned-task list from one task header (see the census module docs).

use std::time::Instant;

use super::memory::Memory;
use super::{OwnedList, OwnedShape, ProcessCensus};

/// Bytes read at a time when scanning memory for task headers.
const SCAN_CHUNK: usize = 1 << 20;

/// The runtimes found so far, and how their lists' elements are laid out.
#[derive(Debug, Default)]
pub(super) struct Found {
    pub runtimes: Vec<OwnedList>,
    pub list_in_element: Option<u64>,
}

/// Looks for runtimes from candidate task headers, a bounded number of them.
pub(super) struct Finder<'a, M: Memory> {
    census: &'a ProcessCensus,
    memory: &'a M,
    candidates_left: usize,
    found: Found,
}

impl<'a, M: Memory> Finder<'a, M> {
    pub fn new(census: &'a ProcessCensus, memory: &'a M, candidates: usize) -> Self {
        Self {
            census,
            memory,
            candidates_left: candidates,
            found: Found::default(),
        }
    }

    pub fn found(&self) -> &[OwnedList] {
        &self.found.runtimes
    }

    pub fn into_found(self) -> Found {
        self.found
    }

    /// Follows the task header at `header` to its runtime's list, if it leads to one not
    /// found yet. Each call spends one candidate.
    pub fn try_header(&mut self, header: u64) {
        if self.candidates_left == 0 {
            return;
        }
        self.candidates_left -= 1;
        let layout = &self.census.layout;
        let Some(vtable) = self.memory.word(header + layout.header_vtable) else {
            return;
        };
        let Some(offsets) = self.census.vtables.get(&vtable) else {
            return;
        };
        let Some(owner_id) = self.memory.word(header + layout.header_owner_id) else {
            return;
        };
        if owner_id == 0 || self.found.runtimes.iter().any(|r| r.owner_id == owner_id) {
            return;
        }
        let Some(scheduler) = self.memory.word(header + offsets.scheduler) else {
            return;
        };
        if scheduler == 0 || !scheduler.is_multiple_of(8) {
            return;
        }
        let handle = scheduler + layout.arc_data;
        let words = self.read_prefix(handle, layout.handle_search_bytes as usize);
        if let Some(runtime) = self.owned_list_in(handle, &words, owner_id) {
            log::debug!(
                "census: runtime {owner_id} has {} task lists at {:#x} (handle {handle:#x}, \
                 from header {header:#x})",
                runtime.shards,
                runtime.lists
            );
            self.found.runtimes.push(runtime);
        }
    }

    /// As much of `[addr, addr + len)` as is readable from its start, as words.
    fn read_prefix(&self, addr: u64, len: usize) -> Vec<u64> {
        const PIECE: usize = 256;
        let mut words = Vec::with_capacity(len / 8);
        let mut piece = [0u8; PIECE];
        for at in (0..len).step_by(PIECE) {
            if !self.memory.read(addr + at as u64, &mut piece) {
                break;
            }
            words.extend(
                piece
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))),
            );
        }
        words
    }

    /// The `OwnedTasks` with id `owner_id` among the words of a handle at `handle`, under
    /// the first of the layout's shapes that validates.
    fn owned_list_in(&mut self, handle: u64, words: &[u64], owner_id: u64) -> Option<OwnedList> {
        self.census
            .layout
            .owned
            .iter()
            .find_map(|&shape| match shape {
                OwnedShape::Sharded {
                    max_shards, window, ..
                } => self.sharded_list_in(words, owner_id, shape, max_shards, window),
                OwnedShape::Single { window } => {
                    self.single_list_in(handle, words, owner_id, shape, window)
                }
            })
    }

    /// A `ShardedList`: near the id, a (pointer, power-of-two length) pair and that length
    /// − 1 (`shard_mask`), whose slice of lists validates.
    fn sharded_list_in(
        &mut self,
        words: &[u64],
        owner_id: u64,
        shape: OwnedShape,
        max_shards: u64,
        window: u64,
    ) -> Option<OwnedList> {
        let window = (window / 8) as usize;
        for (at, _) in words.iter().enumerate().filter(|(_, w)| **w == owner_id) {
            let near = at.saturating_sub(window)..(at + window + 1).min(words.len());
            for pair in near.clone().take(near.len().saturating_sub(1)) {
                let (lists, shards) = (words[pair], words[pair + 1]);
                if lists == 0
                    || !lists.is_multiple_of(8)
                    || !shards.is_power_of_two()
                    || shards < 2
                    || shards > max_shards
                    || !words[near.clone()].contains(&(shards - 1))
                {
                    continue;
                }
                let candidate = OwnedList {
                    owner_id,
                    lists,
                    shards,
                    shape,
                };
                if let Some(offset) = self.validate_lists(&candidate) {
                    self.found.list_in_element = self.found.list_in_element.or(offset);
                    return Some(candidate);
                }
            }
        }
        None
    }

    /// One list in the handle itself: near the id, two adjacent words that are both task
    /// headers of this runtime (`head` and `tail`, in either order). The walk then checks
    /// that one leads to the other through every node's links both ways.
    fn single_list_in(
        &mut self,
        handle: u64,
        words: &[u64],
        owner_id: u64,
        shape: OwnedShape,
        window: u64,
    ) -> Option<OwnedList> {
        let window = (window / 8) as usize;
        for (at, _) in words.iter().enumerate().filter(|(_, w)| **w == owner_id) {
            let near = at.saturating_sub(window)..(at + window + 1).min(words.len());
            for pair in near.clone().take(near.len().saturating_sub(1)) {
                let (a, b) = (words[pair], words[pair + 1]);
                if a == 0
                    || b == 0
                    || !self.is_task_of(a, owner_id)
                    || !self.is_task_of(b, owner_id)
                    || !self.are_list_ends(a, b)
                {
                    continue;
                }
                return Some(OwnedList {
                    owner_id,
                    lists: handle + 8 * pair as u64,
                    shards: 1,
                    shape,
                });
            }
        }
        None
    }

    /// Checks every element of a candidate slice of lists: its two ends are both null (an
    /// empty list) or both task headers of this runtime. Returns where the list sits in an
    /// element, when a non-empty list told (`Some(None)` when every list is empty).
    fn validate_lists(&self, runtime: &OwnedList) -> Option<Option<u64>> {
        let (element_size, list_in_element) = runtime.shape.element();
        let mut bytes = vec![0u8; (runtime.shards * element_size) as usize];
        if !self.memory.read(runtime.lists, &mut bytes) {
            return None;
        }
        let word = |element: u64, offset: u64| {
            let at = (element * element_size + offset) as usize;
            u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
        };
        let known = self.census.learned.list_in_element;
        let mut settled: Option<Option<u64>> = None;
        for &offset in list_in_element {
            if known.is_some_and(|k| k != offset) {
                continue;
            }
            let mut non_empty = 0;
            let valid = (0..runtime.shards).all(|element| {
                let (a, b) = (word(element, offset), word(element, offset + 8));
                match (a, b) {
                    (0, 0) => true,
                    (0, _) | (_, 0) => false,
                    _ => {
                        non_empty += 1;
                        self.is_task_of(a, runtime.owner_id) && self.is_task_of(b, runtime.owner_id)
                    }
                }
            });
            if valid && non_empty > 0 {
                return Some(Some(offset));
            }
            if valid && settled.is_none() {
                settled = Some(None);
            }
        }
        // Every list empty under some reading: a runtime with no task now (each reading
        // then agrees), kept; where the list sits is learned later.
        settled.map(|_| known)
    }

    /// Tasks `a` and `b` can be the two ends of a list: under some place of
    /// `Trailer::owned`, each has a null link (the head no `prev`, the tail no `next`), and
    /// a task that is both ends has two. Other pairs of task pointers near the id (a queue
    /// of tasks to run, linked elsewhere) are passed over.
    fn are_list_ends(&self, a: u64, b: u64) -> bool {
        let census = self.census;
        let links = |header: u64, owned: u64| {
            let vtable = self.memory.word(header + census.layout.header_vtable)?;
            let trailer = census.vtables.get(&vtable)?.trailer;
            self.memory.words::<2>(header + trailer + owned)
        };
        let candidates = match census.learned.trailer_owned {
            Some(known) => vec![known],
            None => census.layout.trailer_owned.to_vec(),
        };
        candidates
            .into_iter()
            .any(|owned| match (links(a, owned), links(b, owned)) {
                (Some(x), Some(_)) if a == b => x == [0, 0],
                (Some(x), Some(y)) => {
                    x != [0, 0] && y != [0, 0] && x.contains(&0) && y.contains(&0)
                }
                _ => false,
            })
    }

    /// `header` is 128-aligned and holds a known vtable and `owner_id`.
    fn is_task_of(&self, header: u64, owner_id: u64) -> bool {
        let layout = &self.census.layout;
        header.is_multiple_of(layout.header_align)
            && self.memory.words::<4>(header).is_some_and(|w| {
                self.census
                    .vtables
                    .contains_key(&w[(layout.header_vtable / 8) as usize])
                    && w[(layout.header_owner_id / 8) as usize] == owner_id
            })
    }

    /// Scans `regions` (start, end) for headers holding a known vtable, trying each until
    /// one leads to a runtime, within `max_bytes` and `deadline`. Returns the bytes read.
    pub fn scan(&mut self, regions: &[(u64, u64)], max_bytes: u64, deadline: Instant) -> u64 {
        let layout = self.census.layout;
        let align = layout.header_align;
        let mut scanned = 0u64;
        let mut chunk = vec![0u8; SCAN_CHUNK];
        for &(start, end) in regions {
            let mut at = start.next_multiple_of(align);
            while at < end {
                if !self.found.runtimes.is_empty()
                    || self.candidates_left == 0
                    || scanned >= max_bytes
                    || Instant::now() >= deadline
                {
                    return scanned;
                }
                let len = (end - at).min(SCAN_CHUNK as u64).min(max_bytes - scanned) as usize;
                let piece = &mut chunk[..len];
                scanned += len as u64;
                if self.memory.read(at, piece) {
                    let slots = piece.len() as u64 / align;
                    let hits: Vec<u64> = (0..slots)
                        .map(|slot| slot * align)
                        .filter(|&offset| {
                            let field = (offset + layout.header_vtable) as usize;
                            piece
                                .get(field..field + 8)
                                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                                .is_some_and(|w| self.census.vtables.contains_key(&w))
                        })
                        .map(|offset| at + offset)
                        .collect();
                    for header in hits {
                        self.try_header(header);
                        if !self.found.runtimes.is_empty() {
                            break;
                        }
                    }
                }
                at += len as u64;
            }
        }
        scanned
    }
}

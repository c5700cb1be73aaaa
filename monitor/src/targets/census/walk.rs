//! Walking a runtime's task lists, validating every link (see the census module docs).

use std::time::Instant;

use super::memory::Memory;
use super::{CensusTask, OwnedList, ProcessCensus};

/// One node of a list, as read.
struct Node {
    vtable: u64,
    task_id: u64,
    completed: bool,
    /// The two words of `Trailer::owned` at the offset tried.
    links: [u64; 2],
}

/// Why a walk stopped before the end of its list.
enum Stop {
    /// A link failed validation: the list changed under the walk (or is not a list).
    Invalid,
    /// The census's task or time bound.
    Bound,
}

/// Walks every list of one runtime.
pub(super) struct Walker<'a, M: Memory> {
    pub census: &'a mut ProcessCensus,
    pub memory: &'a M,
    pub runtime: OwnedList,
    pub deadline: Instant,
    pub max_tasks: usize,
    pub retries: u32,
    /// Nodes read (completed tasks included).
    pub read: u64,
}

impl<M: Memory> Walker<'_, M> {
    /// Appends the runtime's live tasks to `tasks`; returns, per shard, whether its list was
    /// read to the end.
    pub fn walk_all(&mut self, tasks: &mut Vec<CensusTask>) -> Vec<bool> {
        (0..self.runtime.shards)
            .map(|shard| self.walk_shard(shard, tasks))
            .collect()
    }

    /// One shard's list, read again up to `retries` times while it fails validation. What
    /// validated of the best attempt is kept even when no attempt reached the end.
    fn walk_shard(&mut self, shard: u64, tasks: &mut Vec<CensusTask>) -> bool {
        let mut best: Vec<CensusTask> = Vec::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                self.census.figures.retries += 1;
            }
            let mut found = Vec::new();
            match self.walk_once(shard, &mut found, tasks.len()) {
                Ok(()) => {
                    tasks.extend(found);
                    return true;
                }
                Err(Stop::Bound) => {
                    best = found;
                    break;
                }
                Err(Stop::Invalid) => {
                    self.census.figures.links_invalid += 1;
                    if found.len() > best.len() {
                        best = found;
                    }
                }
            }
        }
        self.census.figures.lists_unread += 1;
        tasks.extend(best);
        false
    }

    /// The two ends of shard `shard`'s list (`head`, `tail` in some order) under each
    /// place the list may have in its element that reads as two ends (both null: empty).
    fn ends(&self, shard: u64) -> Vec<(u64, [u64; 2])> {
        let (element_size, list_in_element) = self.runtime.shape.element();
        let element = self.runtime.lists + shard * element_size;
        let Some(words) = self.memory.words::<3>(element) else {
            return Vec::new();
        };
        let align = self.census.layout.header_align;
        list_in_element
            .iter()
            .filter(|&&offset| {
                self.census
                    .learned
                    .list_in_element
                    .is_none_or(|k| k == offset)
            })
            .filter_map(|&offset| {
                let at = (offset / 8) as usize;
                let ends = [*words.get(at)?, *words.get(at + 1)?];
                match ends {
                    [0, 0] => Some((offset, ends)),
                    [a, b]
                        if a != 0
                            && b != 0
                            && a.is_multiple_of(align)
                            && b.is_multiple_of(align) =>
                    {
                        Some((offset, ends))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// Reads the node at `header` with `Trailer::owned` at `owned` in the trailer; `None`
    /// unless it is a task of this runtime's shard `shard`.
    fn node(&self, header: u64, owned: u64, shard: u64) -> Option<Node> {
        let layout = &self.census.layout;
        if !header.is_multiple_of(layout.header_align) {
            return None;
        }
        // The header's first 64 bytes hold the task id too in the lines studied (at 40 or
        // 48): one read instead of two, and within the 128-aligned cell's first page.
        let words = self.memory.words::<8>(header)?;
        let vtable = words[(layout.header_vtable / 8) as usize];
        let offsets = self.census.vtables.get(&vtable)?;
        if words[(layout.header_owner_id / 8) as usize] != self.runtime.owner_id {
            return None;
        }
        let task_id = match words.get((offsets.id / 8) as usize) {
            Some(&id) if offsets.id.is_multiple_of(8) => id,
            _ => self.memory.word(header + offsets.id)?,
        };
        if task_id & (self.runtime.shards - 1) != shard {
            return None;
        }
        let links = self.memory.words::<2>(header + offsets.trailer + owned)?;
        Some(Node {
            vtable,
            task_id,
            completed: words[0] & layout.state_complete != 0,
            links,
        })
    }

    /// One pass over shard `shard`'s list, trying each candidate place of the list in its
    /// element and of `Trailer::owned` in the trailer until one reads the whole list.
    /// `others`: tasks found before, for the bound on tasks read.
    fn walk_once(
        &mut self,
        shard: u64,
        found: &mut Vec<CensusTask>,
        others: usize,
    ) -> Result<(), Stop> {
        let ends = self.ends(shard);
        if ends.iter().any(|(_, e)| *e == [0, 0]) && ends.iter().all(|(_, e)| *e == [0, 0]) {
            return Ok(());
        }
        let owned_candidates: Vec<u64> = match self.census.learned.trailer_owned {
            Some(known) => vec![known],
            None => self.census.layout.trailer_owned.to_vec(),
        };
        let mut outcome = Err(Stop::Invalid);
        let mut best: Vec<CensusTask> = Vec::new();
        for (in_element, [first, last]) in ends.into_iter().filter(|(_, e)| *e != [0, 0]) {
            for &owned in &owned_candidates {
                found.clear();
                let read_before = self.read;
                outcome = self.follow(shard, first, last, owned, found, others);
                match outcome {
                    Ok(()) => {
                        // Only the true places link two or more tasks both ways.
                        if self.read - read_before >= 2 {
                            self.census.learned.trailer_owned = Some(owned);
                            self.census.learned.list_in_element = Some(in_element);
                        }
                        return Ok(());
                    }
                    Err(Stop::Bound) => return outcome,
                    Err(Stop::Invalid) if found.len() > best.len() => {
                        std::mem::swap(found, &mut best);
                    }
                    Err(Stop::Invalid) => {}
                }
            }
        }
        *found = best;
        outcome
    }

    /// Follows the list from the end `first` away from it; every node's back link must
    /// name the node before it. Completed tasks (released soon) are read but not kept.
    fn follow(
        &mut self,
        shard: u64,
        first: u64,
        last: u64,
        owned: u64,
        found: &mut Vec<CensusTask>,
        others: usize,
    ) -> Result<(), Stop> {
        let mut previous = 0u64;
        let mut current = first;
        // Which of the two words points away from `first` (the other is the back link).
        let mut forward: Option<usize> = None;
        loop {
            if others + found.len() >= self.max_tasks || Instant::now() >= self.deadline {
                return Err(Stop::Bound);
            }
            let node = self.node(current, owned, shard).ok_or(Stop::Invalid)?;
            self.read += 1;
            let dir = match forward {
                Some(dir) => {
                    if node.links[1 - dir] != previous {
                        return Err(Stop::Invalid);
                    }
                    dir
                }
                None => match node.links {
                    // A list of one task: both its ends are it.
                    [0, 0] if current == last => 0,
                    [0, 0] => return Err(Stop::Invalid),
                    [0, _] => 1,
                    [_, 0] => 0,
                    _ => return Err(Stop::Invalid),
                },
            };
            forward = Some(dir);
            if !node.completed {
                found.push(CensusTask {
                    header: current,
                    vtable: node.vtable,
                    task_id: node.task_id,
                });
            }
            match node.links[dir] {
                // The list ends where its other end says: a walk that stops elsewhere did
                // not follow this list (or it changed under the walk).
                0 if current == last => return Ok(()),
                0 => return Err(Stop::Invalid),
                next => {
                    previous = current;
                    current = next;
                }
            }
        }
    }
}

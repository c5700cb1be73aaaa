//! Which allocator is Rust's `#[global_allocator]`, decided from what the shims' code calls
//! or jumps to (through `__rdl_*` into libc for `System`, into `_rjem_*` for jemalloc, into
//! `mi_*` for mimalloc), never from configuration; and how each shim forwards.

use iced_x86::FlowControl;

use super::super::disasm::decode_range;
use super::api::*;
use super::code::{Ctx, Dest, near_target};
use super::*;

/// Combines the shims' verdicts; falls back to what the executable links when no shim
/// could be read.
pub(super) fn decide_global(
    votes: &[GlobalAllocator],
    exe: &Path,
    functions: &[AllocFn],
    warnings: &mut Vec<String>,
) -> GlobalAllocator {
    let known: Vec<GlobalAllocator> = votes
        .iter()
        .copied()
        .filter(|&v| v != GlobalAllocator::Unknown)
        .collect();
    if let Some(&first) = known.first() {
        if known.iter().all(|&v| v == first) {
            if known.len() < votes.len() {
                warnings.push(format!(
                    "{} of {} shims reach no known allocator; the others reach {first:?}",
                    votes.len() - known.len(),
                    votes.len()
                ));
            }
            return first;
        }
        let mut counts: Vec<(GlobalAllocator, usize)> = Vec::new();
        for v in &known {
            match counts.iter_mut().find(|(a, _)| a == v) {
                Some((_, n)) => *n += 1,
                None => counts.push((*v, 1)),
            }
        }
        counts.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        warnings.push(format!(
            "the shims disagree about the global allocator ({counts:?}); reporting the most \
             common"
        ));
        return counts[0].0;
    }
    if !votes.is_empty() {
        warnings.push(
            "the Rust shims reach no known allocator (a custom #[global_allocator]?): only \
             the shims themselves can be probed"
                .to_string(),
        );
        return GlobalAllocator::Unknown;
    }
    // No shims at all: say what is linked, but only as a guess.
    let linked = |fam| functions.iter().any(|f| f.family == fam && f.file == exe);
    let guess = if linked(AllocFamily::Jemalloc) {
        GlobalAllocator::Jemalloc
    } else if linked(AllocFamily::Mimalloc) {
        GlobalAllocator::Mimalloc
    } else {
        GlobalAllocator::Unknown
    };
    if guess != GlobalAllocator::Unknown {
        warnings.push(format!(
            "no Rust allocator shims found; {guess:?} is linked into the executable and \
             probably serves Rust's allocations (not verified from code)"
        ));
    }
    guess
}

impl Ctx<'_> {
    /// The allocator a function name belongs to (`local`: defined in this file).
    pub(super) fn classify(&self, name: &str, local: bool) -> Option<GlobalAllocator> {
        let last = last_segment(name);
        if last.starts_with("__rdl_") {
            return Some(GlobalAllocator::System);
        }
        if last.starts_with(JEMALLOC_PREFIX) || JEMALLOC_ONLY.contains(&last) {
            return Some(GlobalAllocator::Jemalloc);
        }
        if MIMALLOC_API.iter().any(|(n, _)| *n == last)
            || last.starts_with("mi_heap_")
            || last.starts_with("_mi_")
        {
            return Some(GlobalAllocator::Mimalloc);
        }
        if LIBC_API.iter().any(|(n, _)| *n == last) {
            if local && self.by_name.contains_key("mallocx") {
                return Some(GlobalAllocator::Jemalloc);
            }
            if local && self.by_name.contains_key("mi_malloc") {
                return Some(GlobalAllocator::Mimalloc);
            }
            return Some(GlobalAllocator::System);
        }
        None
    }

    pub(super) fn classify_dest(&self, d: &Dest) -> Option<GlobalAllocator> {
        match d {
            Dest::Import(n) => self.classify(n, false),
            Dest::Local(a) => self
                .img
                .names_at(*a)
                .iter()
                .find_map(|n| self.classify(n, true)),
        }
    }

    /// Out-of-function call and jump destinations of the function at `start`, in code
    /// order, with whether the function branches internally and how many calls it makes.
    pub(super) fn dests_of(&self, start: u64) -> (Vec<Dest>, bool, usize) {
        let Some((s, e)) = self.img.function_extent(start) else {
            return (Vec::new(), false, 0);
        };
        let mut dests = Vec::new();
        let mut branches = false;
        let mut calls = 0;
        for ins in decode_range(self.img, s, e) {
            let flow = ins.flow_control();
            if matches!(flow, FlowControl::Call | FlowControl::IndirectCall) {
                calls += 1;
            }
            if near_target(&ins).is_some_and(|t| t >= s && t < e) {
                branches |= flow == FlowControl::ConditionalBranch;
                continue;
            }
            if flow == FlowControl::ConditionalBranch {
                branches = true;
            }
            if let Some(d) = self.dest(&ins)
                && !dests.contains(&d)
            {
                dests.push(d);
            }
        }
        (dests, branches, calls)
    }

    /// How the shim at `start` forwards, and to which allocator.
    pub(super) fn forwarding(&self, start: u64) -> Forwarding {
        let (dests, branches, calls) = self.dests_of(start);
        let kind = if dests.is_empty() {
            ForwardKind::SelfContained
        } else if calls > 0 {
            ForwardKind::Calls
        } else if dests.len() == 1 && !branches {
            ForwardKind::TailJump
        } else {
            ForwardKind::Inlined
        };
        // An alias: the shim's address also carries the implementation's name.
        let own = self
            .img
            .names_at(start)
            .iter()
            .find_map(|n| self.classify(n, true));

        let mut reaches = Vec::new();
        let mut verdicts: Vec<GlobalAllocator> = own.into_iter().collect();
        let mut seen: HashSet<Dest> = HashSet::new();
        seen.insert(Dest::Local(start));
        let mut queue: VecDeque<(Dest, usize)> = dests.iter().map(|d| (d.clone(), 1)).collect();
        while let Some((d, depth)) = queue.pop_front() {
            if !seen.insert(d.clone()) || seen.len() > 64 {
                continue;
            }
            let class = self.classify_dest(&d);
            if let Some(c) = class {
                reaches.push(self.dest_name(&d));
                verdicts.push(c);
            }
            // Follow `__rdl_*` and unnamed glue, not the allocators themselves.
            let descend = match (&d, class) {
                (Dest::Import(_), _) => false,
                (Dest::Local(a), Some(GlobalAllocator::System)) => self
                    .img
                    .names_at(*a)
                    .iter()
                    .any(|n| last_segment(n).starts_with("__rdl_")),
                (_, Some(_)) => false,
                (_, None) => true,
            };
            if descend
                && depth < MAX_FORWARD_DEPTH
                && let Dest::Local(a) = d
            {
                for next in self.dests_of(a).0 {
                    queue.push_back((next, depth + 1));
                }
            }
        }
        let allocator = [
            GlobalAllocator::Jemalloc,
            GlobalAllocator::Mimalloc,
            GlobalAllocator::System,
        ]
        .into_iter()
        .find(|a| verdicts.contains(a))
        .unwrap_or(GlobalAllocator::Unknown);
        Forwarding {
            kind,
            targets: dests.iter().map(|d| self.dest_name(d)).collect(),
            reaches,
            allocator,
        }
    }
}

//! Second naming pass, across all vtables of the image.
//!
//! [`super::vtables::name_vtable`] names each vtable from its own code. Two things it cannot
//! do alone:
//! - **check a poll-walk label that nothing of the vtable's own confirms.** The walk stops
//!   at the first function that looks like a future's poll; when the task's future was
//!   inlined into the glue, that is a future the task *awaits* (`tokio::time::sleep::Sleep`).
//!   Such a label is only kept when it is the future type of some task cell in the binary.
//! - **tell apart future types whose drop glue identical code folding merged**
//!   (`housekeeping::{{closure}} | ok_bounded::{{closure}}::{{closure}}`). tokio creates
//!   exactly one vtable per `(T, S)`, so a type that is already the known answer of another
//!   vtable with the same scheduler is not this one's ([`eliminate`]); and the code that
//!   creates the task (the function referencing the vtable, then its callers up to the first
//!   non-runtime function) usually names the item that defines the future
//!   ([`spawner_evidence`]).
//!
//! Both narrowings only remove candidates. A result that contradicts the one-vtable-per-
//! `(T, S)` rule (two vtables of one scheduler with the same inferred label) is undone and
//! reported: a wrong label is worse than an ambiguous one.

use std::collections::{HashMap, HashSet};

use iced_x86::OpKind;

use super::disasm;
use super::elf::Image;
use super::naming;
use super::vtables::{self, Naming, RawVtable};
use super::{NamingMethod, Scheduler};

/// A future type held by a task cell somewhere in the binary, from the name of a
/// `drop_in_place<…Cell<T, S>>` (or v0 `raw::poll::<T, S>`) function. `BlockingTask<F>` is
/// unwrapped to `F`, like site labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CellType {
    pub label: String,
    pub scheduler: Option<Scheduler>,
}

/// Every task-cell future type named anywhere in the image.
pub(crate) fn cell_universe(img: &Image) -> Vec<CellType> {
    let mut out: Vec<CellType> = Vec::new();
    // One type per spawn site: a set to keep them distinct in linear time.
    let mut seen: HashSet<CellType> = HashSet::new();
    for f in img.functions.values() {
        for n in &f.names {
            let Some((t, s)) = naming::cell_drop_glue_args(n).or_else(|| naming::raw_poll_args(n))
            else {
                continue;
            };
            let t = naming::blocking_task_inner(&t).unwrap_or(t);
            let c = CellType {
                label: naming::clean_label(&t),
                scheduler: naming::scheduler_in_name(&s),
            };
            if seen.insert(c.clone()) {
                out.push(c);
            }
        }
    }
    out
}

/// The poll-walk labels that may name a task of scheduler `scheduler`, given the task-cell
/// types of the whole binary (`universe`):
/// - a label naming a cell type of that scheduler (ignoring generics) is kept;
/// - a user-code label that nests in one or contains one at a path boundary (an inner
///   `{{closure}}` of the cell's future, the fn item of a `spawn_blocking` closure) is kept;
/// - a library label (tokio, std, core, alloc, futures, hyper) must be a cell type itself:
///   `tokio::time::sleep::Sleep` reached through an inlined `async { sleep(d).await }` is
///   not a spawn site unless something spawned a bare `Sleep`.
///
/// With no task-cell names in the binary at all there is nothing to check against; then
/// only library labels are dropped.
pub(crate) fn confirmed_labels(
    labels: &[String],
    scheduler: Option<Scheduler>,
    universe: &[CellType],
) -> Vec<String> {
    labels
        .iter()
        .filter(|l| {
            let library = naming::is_library_label(l);
            if universe.is_empty() {
                return !library;
            }
            universe.iter().any(|c| {
                let same_scheduler =
                    scheduler.is_none() || c.scheduler.is_none() || c.scheduler == scheduler;
                same_scheduler
                    && if library {
                        naming::same_site(l, &c.label)
                    } else {
                        naming::related_site(l, &c.label)
                    }
            })
        })
        .cloned()
        .collect()
}

/// One vtable's candidate labels, for [`eliminate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Site {
    pub scheduler: Option<Scheduler>,
    /// Possible labels; one when known.
    pub candidates: Vec<String>,
}

/// Narrowing by elimination, to a fixed point: tokio creates exactly one vtable per
/// `(future type, scheduler)`, so a label that is the single candidate of one vtable is not
/// a candidate of another vtable with the same scheduler. Labels compare ignoring generic
/// arguments ([`naming::same_site`]).
///
/// Vtables with an unknown scheduler neither lose nor remove candidates. A scheduler whose
/// known labels already repeat (the one-vtable rule does not hold in this binary, e.g. a
/// vtable duplicated across codegen units) is left alone, and a candidate set is never
/// emptied.
pub(crate) fn eliminate(sites: &mut [Site]) {
    loop {
        // Known labels (generics stripped) per scheduler, and schedulers where they repeat.
        let mut known: HashMap<Scheduler, HashSet<String>> = HashMap::new();
        let mut repeated: HashSet<Scheduler> = HashSet::new();
        for s in sites.iter() {
            if let (Some(sched), [only]) = (s.scheduler, s.candidates.as_slice())
                && !known
                    .entry(sched)
                    .or_default()
                    .insert(naming::strip_generics(only))
            {
                repeated.insert(sched);
            }
        }
        let mut changed = false;
        for s in sites.iter_mut() {
            let Some(sched) = s.scheduler else { continue };
            if s.candidates.len() < 2 || repeated.contains(&sched) {
                continue;
            }
            let Some(taken) = known.get(&sched) else {
                continue;
            };
            let left: Vec<String> = s
                .candidates
                .iter()
                .filter(|c| !taken.contains(&naming::strip_generics(c)))
                .cloned()
                .collect();
            if !left.is_empty() && left.len() < s.candidates.len() {
                s.candidates = left;
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

/// Levels of callers followed up from the code that references a vtable. `Cell::new` →
/// `Handle::spawn`/`bind_new_task` → `task::spawn` → user code is 3 in release builds;
/// `spawn_blocking` and unoptimised builds add a few.
const MAX_SPAWNER_LEVELS: usize = 8;
/// Functions visited at most per vtable (fan-in through shared runtime code).
const MAX_SPAWNER_NODES: usize = 512;

/// Static facts about the whole code of the image, built only when some site is still
/// ambiguous after elimination.
struct CodeIndex {
    /// Function start → starts of the functions that call or jump to it.
    callers: HashMap<u64, Vec<u64>>,
    /// Vtable address → starts of the functions whose code refers to it.
    refs: HashMap<u64, Vec<u64>>,
    /// Code address → data words holding it (trait-object vtable slots, GOT entries, …).
    slots: HashMap<u64, Vec<u64>>,
}

impl CodeIndex {
    fn build(img: &Image, vtables: &HashSet<u64>) -> CodeIndex {
        let mut callers: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut refs: HashMap<u64, Vec<u64>> = HashMap::new();
        for &start in img.functions.keys() {
            if img.budget.spent() {
                break;
            }
            let Some((s, e)) = img.function_extent(start) else {
                continue;
            };
            for instr in disasm::decode_range(img, s, e) {
                if let Some(t) = disasm::static_target(img, &instr)
                    && (t < s || t >= e)
                {
                    push_unique(callers.entry(t).or_default(), start);
                }
                for op in 0..instr.op_count() {
                    let addr = match instr.op_kind(op) {
                        OpKind::Memory if instr.is_ip_rel_memory_operand() => {
                            instr.ip_rel_memory_address()
                        }
                        OpKind::Memory
                            if instr.memory_base() == iced_x86::Register::None
                                && instr.memory_index() == iced_x86::Register::None =>
                        {
                            instr.memory_displacement64()
                        }
                        OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64 => {
                            instr.immediate(op)
                        }
                        _ => continue,
                    };
                    // Directly, or through a GOT slot that holds the vtable's address.
                    let target = if vtables.contains(&addr) {
                        addr
                    } else if let Some(&v) = img.relocs.get(&addr)
                        && vtables.contains(&v)
                    {
                        v
                    } else {
                        continue;
                    };
                    push_unique(refs.entry(target).or_default(), start);
                }
            }
        }
        let mut slots: HashMap<u64, Vec<u64>> = HashMap::new();
        for (lo, hi) in img.data_ranges() {
            let Some(mut a) = lo.checked_next_multiple_of(8) else {
                continue;
            };
            while hi.saturating_sub(a) >= 8 && !img.budget.spent() {
                if let Some(v) = img.read_word(a)
                    && img.functions.contains_key(&v)
                {
                    slots.entry(v).or_default().push(a);
                }
                a += 8;
            }
        }
        CodeIndex {
            callers,
            refs,
            slots,
        }
    }

    /// Names under which `f` is known besides its own: the drop glue of every trait-object
    /// vtable that has `f` as its first method (`[drop_in_place, size, align, f, …]`). A
    /// boxed `async` block's poll function has a generic-free legacy name
    /// (`<F as axum::handler::Handler<T,S>>::call::{{closure}}`), but the drop glue next to
    /// it in its `dyn Future` vtable spells the concrete type
    /// (`drop_in_place<<app::handler as axum::handler::Handler<…>>::call::{{closure}}>`).
    fn dyn_aliases<'a>(&self, img: &'a Image, f: u64) -> Vec<&'a String> {
        let mut out = Vec::new();
        for &slot in self.slots.get(&f).map(Vec::as_slice).unwrap_or(&[]) {
            let Some(base) = slot.checked_sub(24) else {
                continue;
            };
            let (Some(drop), Some(size), Some(align)) = (
                img.read_word(base),
                img.read_word(base + 8),
                img.read_word(base + 16),
            ) else {
                continue;
            };
            let plausible = align.is_power_of_two()
                && align <= 1 << 16
                && size < 1 << 32
                && size.is_multiple_of(align);
            if !plausible {
                continue;
            }
            out.extend(
                img.names_at(drop)
                    .iter()
                    .filter(|n| n.starts_with("core::ptr::drop_in_place")),
            );
        }
        out
    }
}

/// Adds `x` unless it is the last entry: [`CodeIndex::build`] handles one function at a
/// time, so a repeat can only be the last entry. Searching the whole list instead made the
/// build quadratic in the callers of popular functions (`__rust_dealloc` has tens of
/// thousands in a large service).
fn push_unique(v: &mut Vec<u64>, x: u64) {
    if v.last() != Some(&x) {
        v.push(x);
    }
}

/// True when every name of a function is runtime or standard-library code, i.e. the
/// upward walk from a vtable has not reached the code that chose to spawn yet.
fn spawn_plumbing(names: &[String]) -> bool {
    !names.is_empty() && names.iter().all(|n| naming::is_library_label(n))
}

/// The candidates of the vtable at `vaddr` that the code creating its tasks points at.
///
/// Walks up from the functions that reference the vtable (`Cell::new`, where tokio builds
/// the task) through their callers, level by level, past runtime code only. At the first
/// level where some function's names (or its [`CodeIndex::dyn_aliases`]) mention the item
/// that defines a candidate ([`naming::owner_path`]: `app::handler` for an async block in
/// `async fn handler`), those candidates are the ones kept. `None` when no level mentions
/// any candidate, or every candidate is mentioned at the same level (no information).
fn spawner_evidence(
    img: &Image,
    idx: &CodeIndex,
    vaddr: u64,
    candidates: &[String],
) -> Option<Vec<String>> {
    let owners: Vec<Option<String>> = candidates.iter().map(|c| naming::owner_path(c)).collect();
    if owners.iter().all(Option::is_none) {
        return None;
    }
    let mut frontier: Vec<u64> = idx.refs.get(&vaddr)?.clone();
    let mut seen: HashSet<u64> = frontier.iter().copied().collect();
    for level in 0..=MAX_SPAWNER_LEVELS {
        let mut matched = vec![false; candidates.len()];
        for &f in &frontier {
            let aliases = idx.dyn_aliases(img, f);
            for name in img.names_at(f).iter().chain(aliases) {
                for (i, owner) in owners.iter().enumerate() {
                    if let Some(o) = owner
                        && naming::mentions_path(name, o)
                    {
                        log::trace!(
                            "vtable@0x{vaddr:x}: level {level} 0x{f:x} ({name}) mentions {o}"
                        );
                        matched[i] = true;
                    }
                }
            }
        }
        let hits = matched.iter().filter(|&&m| m).count();
        if hits > 0 {
            return (hits < candidates.len()).then(|| {
                candidates
                    .iter()
                    .zip(&matched)
                    .filter(|(_, m)| **m)
                    .map(|(c, _)| c.clone())
                    .collect()
            });
        }
        let mut next = Vec::new();
        for &f in &frontier {
            if !spawn_plumbing(img.names_at(f)) {
                continue;
            }
            for &c in idx.callers.get(&f).map(Vec::as_slice).unwrap_or(&[]) {
                if seen.insert(c) {
                    next.push(c);
                }
            }
        }
        if next.is_empty() || seen.len() > MAX_SPAWNER_NODES {
            return None;
        }
        frontier = next;
    }
    None
}

/// Runs the second pass over `names` (index-aligned with `raws`). See the module docs.
pub(crate) fn resolve(
    img: &Image,
    raws: &[RawVtable],
    names: &mut [Naming],
    warnings: &mut Vec<String>,
) {
    let universe = cell_universe(img);
    for (vt, n) in raws.iter().zip(names.iter_mut()) {
        if !n.unconfirmed {
            continue;
        }
        n.unconfirmed = false;
        let kept = confirmed_labels(&n.candidates, n.scheduler, &universe);
        if kept.is_empty() {
            log::debug!(
                "vtable@0x{:x}: poll walk reached {}, which is no task cell's future type; \
                 not used as a label",
                vt.vaddr,
                n.candidates.join(" | ")
            );
            n.candidates.clear();
            n.method = NamingMethod::StrippedScan;
            n.future_fn = None;
        } else {
            n.candidates = kept;
        }
        n.relabel(vt.vaddr);
    }

    let before: Vec<Site> = names
        .iter()
        .map(|n| Site {
            scheduler: n.scheduler,
            candidates: n.candidates.clone(),
        })
        .collect();
    let mut sites = before.clone();
    eliminate(&mut sites);
    let ambiguous: HashSet<u64> = raws
        .iter()
        .zip(&sites)
        .filter(|(_, s)| s.candidates.len() > 1)
        .map(|(vt, _)| vt.vaddr)
        .collect();
    if !ambiguous.is_empty() {
        let idx = CodeIndex::build(img, &ambiguous);
        for (vt, s) in raws.iter().zip(sites.iter_mut()) {
            if s.candidates.len() < 2 {
                continue;
            }
            if let Some(keep) = spawner_evidence(img, &idx, vt.vaddr, &s.candidates) {
                log::debug!(
                    "vtable@0x{:x}: spawning code narrows {} to {}",
                    vt.vaddr,
                    s.candidates.join(" | "),
                    keep.join(" | ")
                );
                s.candidates = keep;
            }
        }
        eliminate(&mut sites);
    }
    undo_contradictions(&before, &mut sites, warnings);

    for ((vt, n), s) in raws.iter().zip(names.iter_mut()).zip(sites) {
        if s.candidates == n.candidates {
            continue;
        }
        log::debug!(
            "vtable@0x{:x}: {} narrowed to {}",
            vt.vaddr,
            n.candidates.join(" | "),
            s.candidates.join(" | ")
        );
        n.candidates = s.candidates;
        if n.method != NamingMethod::FuturePollCall && n.candidates.len() == 1 {
            n.method = NamingMethod::CellDropGlue;
            n.future_fn = vtables::function_named(img, &n.candidates[0]);
        }
        n.relabel(vt.vaddr);
    }
}

/// Undoes the narrowing of every scheduler where it produced a label that two vtables now
/// share (impossible if each `(T, S)` has one vtable, so some inference was wrong), and
/// says so.
fn undo_contradictions(before: &[Site], sites: &mut [Site], warnings: &mut Vec<String>) {
    let mut labels: HashMap<(Scheduler, String), usize> = HashMap::new();
    for s in sites.iter() {
        if let (Some(sched), [only]) = (s.scheduler, s.candidates.as_slice()) {
            *labels
                .entry((sched, naming::strip_generics(only)))
                .or_default() += 1;
        }
    }
    let mut bad: Vec<Scheduler> = Vec::new();
    for (b, s) in before.iter().zip(sites.iter()) {
        if let (Some(sched), [only]) = (s.scheduler, s.candidates.as_slice())
            && b.candidates.len() > 1
            && labels[&(sched, naming::strip_generics(only))] > 1
            && !bad.contains(&sched)
        {
            bad.push(sched);
        }
    }
    for sched in bad {
        warnings.push(format!(
            "could not tell apart the {sched} spawn sites whose drop glue was merged by \
             identical code folding (narrowing them gave two vtables the same future type); \
             they keep all their candidate labels"
        ));
        for (b, s) in before.iter().zip(sites.iter_mut()) {
            if s.scheduler == Some(sched) {
                s.candidates = b.candidates.clone();
            }
        }
    }
}

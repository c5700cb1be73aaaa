//! Finding tokio task vtables and naming the spawn site each one belongs to.
//!
//! tokio creates one `static Vtable` per `(future type, scheduler)` pair, and every task
//! header points at its vtable, so the vtable address is the natural key for a spawn site
//! at run time. This module finds those records in the image and recovers a human label
//! for each from the code and names around it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::rc::Rc;

use super::disasm::{Step, Walker};
use super::elf::Image;
use super::naming::{self, Role};
use super::task_layout::VtableLayout;
use super::{NamingMethod, Scheduler};

/// Demangled (generic-free) path of the vtable's `poll` entry.
pub(crate) const RAW_POLL: &str = "tokio::runtime::task::raw::poll";

/// How far call chains are followed from a vtable function. `raw::poll` → `Harness::poll`
/// → future is depth 2 in fat-LTO builds; `catch_unwind`/`Core::poll` layers add up to
/// three more when not inlined.
pub(crate) const MAX_DEPTH: usize = 5;

/// One task vtable record, read with the binary's [`VtableLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawVtable {
    pub vaddr: u64,
    pub poll: u64,
    /// Absent before tokio 1.23.
    pub schedule: Option<u64>,
    pub dealloc: u64,
    pub shutdown: u64,
    /// `trailer_offset`, `scheduler_offset`, `id_offset`, when the record has them.
    pub offsets: Option<[u64; 3]>,
}

/// True for the three trailing offsets of a real vtable: `scheduler_offset` is the header
/// size (32 on tokio 1.4x/1.5x; allowed 16..512), `id_offset` follows the scheduler (equal
/// to it when the scheduler is zero-sized, as `BlockingSchedule` is), and the trailer comes
/// after the future, so it can be large. All are 8-aligned because every field involved
/// holds pointers or `u64`s. Checked against the symbol-based result on the fixtures.
pub(crate) fn plausible_offsets(trailer: u64, scheduler: u64, id: u64) -> bool {
    let aligned = trailer.is_multiple_of(8) && scheduler.is_multiple_of(8) && id.is_multiple_of(8);
    aligned
        && (16..512).contains(&scheduler)
        && scheduler <= id
        && id < trailer
        && trailer < 1 << 28
}

/// Reads a candidate record at `vaddr`: the layout's code pointers, then its offsets.
fn read_record(img: &Image, layout: &VtableLayout, vaddr: u64) -> Option<RawVtable> {
    let mut fns = Vec::with_capacity(layout.entries.len());
    for i in 0..layout.fn_words() {
        let w = img.read_word(vaddr + 8 * i)?;
        if !img.is_code(w) {
            return None;
        }
        fns.push(w);
    }
    let offsets = if layout.offsets {
        let base = vaddr + 8 * layout.fn_words();
        Some([
            img.read_word(base)?,
            img.read_word(base + 8)?,
            img.read_word(base + 16)?,
        ])
    } else {
        None
    };
    let at = |name: &str| layout.entry(name).map(|i| fns[i]);
    Some(RawVtable {
        vaddr,
        poll: fns[0],
        schedule: at("schedule"),
        dealloc: at("dealloc")?,
        shutdown: at("shutdown")?,
        offsets,
    })
}

/// Scans the image's data for task vtables laid out as `layout` says.
///
/// With symbols (`poll_fns` = the `raw::poll` functions), a record is a vtable when its
/// first word is a `raw::poll` function: exact, and independent of the offsets' values.
/// Without symbols, the record shape alone decides (code pointers + plausible offsets, so
/// only records that have offsets can be found); on the fixtures both find the same set.
pub(crate) fn find_vtables(
    img: &Image,
    layout: &VtableLayout,
    poll_fns: Option<&BTreeSet<u64>>,
) -> Vec<RawVtable> {
    if poll_fns.is_none() && !layout.offsets {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (lo, hi) in img.data_ranges() {
        let Some(mut a) = lo.checked_next_multiple_of(8) else {
            continue;
        };
        while hi.saturating_sub(a) >= 8 * layout.record_words() {
            if img.budget.spent() {
                break;
            }
            let Some(w0) = img.read_word(a) else {
                a += 8;
                continue;
            };
            let hit = match poll_fns {
                Some(polls) => polls.contains(&w0),
                None => img.is_code(w0),
            };
            if let Some(vt) = hit.then(|| read_record(img, layout, a)).flatten()
                && (poll_fns.is_some()
                    || vt
                        .offsets
                        .is_some_and(|[t, s, i]| plausible_offsets(t, s, i)))
            {
                out.push(vt);
                // Records can sit back to back: step over the functions only when the
                // offsets were not checked.
                a += 8 * if poll_fns.is_some() {
                    layout.fn_words()
                } else {
                    layout.record_words()
                };
                continue;
            }
            a += 8;
        }
    }
    out.sort_by_key(|v| v.vaddr);
    out.dedup_by_key(|v| v.vaddr);
    out
}

/// The outcome of naming one vtable.
#[derive(Debug, Clone)]
pub(crate) struct Naming {
    pub site: String,
    pub method: NamingMethod,
    /// Address of the future's poll function (or of the closure for blocking tasks) when
    /// known, for DWARF line lookup.
    pub future_fn: Option<u64>,
    pub scheduler: Option<Scheduler>,
    pub blocking: bool,
    /// Set when the label is doubtful (the two methods disagreed and neither is
    /// conclusive); becomes a warning.
    pub note: Option<String>,
    /// The labels this site can still have; `site` is them joined with `" | "`. One when
    /// the site is known, several when identical code folding merged drop glue, none for
    /// [`NamingMethod::StrippedScan`]. [`super::resolve`] narrows them across vtables.
    pub candidates: Vec<String>,
    /// `candidates` come from the poll walk and this vtable has no task-cell drop glue to
    /// confirm them: [`super::resolve`] checks them against every task cell in the binary.
    pub unconfirmed: bool,
}

impl Naming {
    /// Recomputes `site` from `candidates` (or the `vtable@0x…` placeholder).
    pub(crate) fn relabel(&mut self, vaddr: u64) {
        self.site = if self.candidates.is_empty() {
            format!("vtable@0x{vaddr:x}")
        } else {
            join(self.candidates.iter())
        };
    }
}

struct PollCandidate {
    addr: u64,
    labels: Vec<String>,
}

/// Names the spawn site of `vt` from its own code: the future's own poll function reached
/// from `poll` ([`NamingMethod::FuturePollCall`]), else the future type in the task cell's
/// drop glue ([`NamingMethod::CellDropGlue`]). The two are cross-checked: when the poll
/// walk found a function that is none of the drop-glue types, the future was inlined and
/// the walk landed in its body, so the drop-glue types win (several when identical code
/// folding merged their glue). This is only the first pass: [`super::resolve::resolve`]
/// then checks unconfirmed poll-walk labels against every task cell in the binary and
/// narrows folded candidate sets across vtables.
pub(crate) fn name_vtable(w: &mut Walker<'_>, memo: &mut CellMemo, vt: &RawVtable) -> Naming {
    // v0 names spell `T` in `raw::poll::<T, S>` itself. That is exact (each vtable has
    // its own `raw::poll`), whereas drop glue may be folded across types.
    let mut poll_types: Vec<(String, String)> = Vec::new();
    for n in w.img.names_at(vt.poll) {
        if let Some(ts) = naming::raw_poll_args(n)
            && !poll_types.contains(&ts)
        {
            poll_types.push(ts);
        }
    }
    let mut found = walk_vtable(w, memo, vt, MAX_DEPTH, false);
    if found.candidates.is_empty() && found.cells.is_empty() {
        // Nothing at all: probably an unoptimised build, where ~12 un-inlined layers
        // (`poll_inner`, `poll_future`, `catch_unwind`, `__rust_try`, closures) separate
        // the vtable from the future. Only then walk deeper, through more glue.
        found = walk_vtable(w, memo, vt, DEEP_DEPTH, true);
    }
    let Found {
        candidates,
        mut cells,
        saw_blocking,
        ..
    } = found;

    if poll_types.len() == 1 {
        cells = poll_types;
    }

    // Future types from drop glue, with `BlockingTask<F>` unwrapped to `F`.
    let mut cell_types: Vec<String> = Vec::new();
    let mut seen_types: HashSet<String> = HashSet::new();
    let mut blocking = saw_blocking;
    let mut scheduler = None;
    for (t, s) in &cells {
        let label = match naming::blocking_task_inner(t) {
            Some(f) => {
                blocking = true;
                f
            }
            None => t.clone(),
        };
        let label = naming::clean_label(&label);
        if seen_types.insert(label.clone()) {
            cell_types.push(label);
        }
        if scheduler.is_none() {
            scheduler = naming::scheduler_in_name(s);
        }
    }
    if scheduler.is_none() {
        scheduler = scheduler_from_schedule_fn(w, vt);
    }
    if scheduler == Some(Scheduler::Blocking) {
        blocking = true;
    }

    log::debug!(
        "vtable@0x{:x}: poll candidates {:?}, cell types {:?}, scheduler {:?}",
        vt.vaddr,
        candidates
            .iter()
            .map(|(d, c)| (d, format!("0x{:x}", c.addr), &c.labels))
            .collect::<Vec<_>>(),
        cell_types,
        scheduler
    );
    let min_depth = candidates.iter().map(|(d, _)| *d).min();
    let first = candidates
        .into_iter()
        .filter(|(d, _)| Some(*d) == min_depth)
        .map(|(_, c)| c)
        .next();

    let (candidates, method, future_fn, unconfirmed) = match first {
        Some(c) => {
            let matching: Vec<String> = c
                .labels
                .iter()
                .filter(|l| cell_types.iter().any(|t| naming::same_site(l, t)))
                .cloned()
                .collect();
            if !matching.is_empty() {
                (matching, NamingMethod::FuturePollCall, Some(c.addr), false)
            } else if cell_types.is_empty() {
                // Nothing of this vtable's own to confirm the walk with: `resolve` checks
                // the label against every task cell type in the binary.
                (c.labels, NamingMethod::FuturePollCall, Some(c.addr), true)
            } else {
                // The expected case when the future's poll was inlined into the glue: the
                // walk lands in the future's body (e.g. `<Sleep as Future>::poll`), which is
                // not what the task cell holds. The cell's drop glue is authoritative about
                // the future type; folded glue (several types) is narrowed by `resolve`.
                log::debug!(
                    "vtable@0x{:x}: poll walk reached {} but the task cell holds {}; the \
                     future's poll was inlined",
                    vt.vaddr,
                    c.labels.join(" | "),
                    cell_types.join(" | ")
                );
                let addr = (cell_types.len() == 1)
                    .then(|| function_named(w.img, &cell_types[0]))
                    .flatten();
                (cell_types.clone(), NamingMethod::CellDropGlue, addr, false)
            }
        }
        None if !cell_types.is_empty() => {
            let addr = (cell_types.len() == 1)
                .then(|| function_named(w.img, &cell_types[0]))
                .flatten();
            (cell_types.clone(), NamingMethod::CellDropGlue, addr, false)
        }
        None => (Vec::new(), NamingMethod::StrippedScan, None, false),
    };
    let mut n = Naming {
        site: String::new(),
        method,
        future_fn,
        scheduler,
        blocking,
        note: None,
        candidates,
        unconfirmed,
    };
    n.relabel(vt.vaddr);
    n
}

/// Depth of the fallback walk for unoptimised builds.
const DEEP_DEPTH: usize = 16;

/// What the walks from one vtable's `poll` and `dealloc` entries found.
struct Found {
    /// Possible future poll functions with the call depth they were found at.
    candidates: Vec<(usize, PollCandidate)>,
    /// `(T, S)` of task cells in drop-glue names.
    cells: Vec<(String, String)>,
    /// The same, to keep `cells` distinct in time linear in their number: glue folded
    /// across types has a name per type, hundreds in a large service.
    cells_seen: HashSet<(String, String)>,
    saw_blocking: bool,
}

/// Walks from the vtable's `poll` entry (for the future's poll function and drop glue) and
/// from its `dealloc` entry (for drop glue), through runtime plumbing only.
fn walk_vtable(
    w: &mut Walker<'_>,
    memo: &mut CellMemo,
    vt: &RawVtable,
    depth: usize,
    deep: bool,
) -> Found {
    let mut found = Found {
        candidates: Vec::new(),
        cells: Vec::new(),
        cells_seen: HashSet::new(),
        saw_blocking: false,
    };
    w.walk(&[vt.poll], depth, |v| {
        log::trace!(
            "vtable@0x{:x} poll walk: depth {} 0x{:x} {:?}",
            vt.vaddr,
            v.depth,
            v.addr,
            v.names
        );
        collect_cells(&memo.at(v.addr, v.names), &mut found);
        let (role, futures) =
            naming::role_of_names(v.names.iter().map(String::as_str), v.in_blocking, deep);
        if v.names.iter().any(|n| n.contains("BlockingTask")) {
            found.saw_blocking = true;
        }
        match role {
            Role::Plumbing => Step::Descend,
            Role::FuturePoll => {
                let mut labels: Vec<String> = Vec::new();
                for f in futures {
                    let l = naming::poll_fn_label(f);
                    if !labels.contains(&l) {
                        labels.push(l);
                    }
                }
                found.candidates.push((
                    v.depth,
                    PollCandidate {
                        addr: v.addr,
                        labels,
                    },
                ));
                Step::Stop
            }
            Role::Library | Role::Other => Step::Stop,
        }
    });
    w.walk(&[vt.dealloc], depth, |v| {
        collect_cells(&memo.at(v.addr, v.names), &mut found);
        if naming::role_of_names(v.names.iter().map(String::as_str), false, deep).0
            == Role::Plumbing
        {
            Step::Descend
        } else {
            Step::Stop
        }
    });
    found
}

/// Adds the `(T, S)` of every task-cell drop glue among `names` to `cells`.
fn collect_cells(cells: &[(String, String)], found: &mut Found) {
    for ts in cells {
        if !found.cells_seen.contains(ts) {
            found.cells_seen.insert(ts.clone());
            found.cells.push(ts.clone());
        }
    }
}

/// The `(T, S)` of every task-cell drop glue among a function's names, parsed once per
/// function: glue folded across types has a name per type (hundreds in a large service)
/// and is reached from the walks of many vtables.
#[derive(Debug, Default)]
pub(crate) struct CellMemo(HashMap<u64, Rc<[(String, String)]>>);

impl CellMemo {
    fn at(&mut self, addr: u64, names: &[String]) -> Rc<[(String, String)]> {
        self.0
            .entry(addr)
            .or_insert_with(|| {
                names
                    .iter()
                    .filter_map(|n| naming::cell_drop_glue_args(n))
                    .collect()
            })
            .clone()
    }
}

fn join<'a>(labels: impl IntoIterator<Item = &'a String>) -> String {
    labels
        .into_iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The unique function named `label` (used to place a drop-glue-named site in the source
/// when the closure still exists as a function): exact match first, then ignoring generic
/// arguments (drop glue spells `f<A, B>::{{closure}}`, the function's legacy name `f::…`).
pub(crate) fn function_named(img: &Image, label: &str) -> Option<u64> {
    let unique = |hits: Vec<u64>| match hits.as_slice() {
        &[only] => Some(only),
        _ => None,
    };
    unique(img.functions_named(label))
        .or_else(|| unique(img.find_functions(&naming::strip_generics(label))))
}

/// The scheduler a vtable belongs to, from what its `schedule` entry calls
/// (`<Arc<current_thread::Handle> as Schedule>::schedule`, …).
fn scheduler_from_schedule_fn(w: &mut Walker<'_>, vt: &RawVtable) -> Option<Scheduler> {
    let mut found = None;
    let root = vt.schedule?;
    let own: Vec<String> = w.img.names_at(root).to_vec();
    for n in &own {
        if let Some(s) = naming::scheduler_in_name(n) {
            return Some(s);
        }
    }
    w.walk(&[root], 2, |v| {
        if found.is_none() {
            found = v.names.iter().find_map(|n| naming::scheduler_in_name(n));
        }
        if naming::role_of_names(v.names.iter().map(String::as_str), false, false).0
            == Role::Plumbing
        {
            Step::Descend
        } else {
            Step::Stop
        }
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sanity() {
        assert!(plausible_offsets(184, 32, 40));
        assert!(
            plausible_offsets(0x1_2340, 32, 40),
            "large futures push the trailer far"
        );
        assert!(plausible_offsets(128, 32, 32), "zero-sized scheduler");
        assert!(
            !plausible_offsets(0, 8, 8),
            "a trait-object vtable's drop/size/align"
        );
        assert!(!plausible_offsets(184, 32, 41));
        assert!(!plausible_offsets(40, 32, 48));
    }
}

//! Static discovery: what to probe in an unmodified tokio binary, and how to name what the
//! probes will see.
//!
//! [`analyze`] reads an x86_64 ELF executable (no root, no running process needed) and
//! returns:
//! - every tokio **task vtable** with a label for its spawn site. tokio emits one vtable per
//!   spawned future type and scheduler, and every live task's header points at its vtable,
//!   so the eBPF side can group tasks by site just by reading that pointer;
//! - the **hook points** (uprobe addresses and file offsets) for spawn, `spawn_blocking` and
//!   completion (and the first poll of task types whose spawn path was inlined), with the
//!   register that carries the task header pointer, verified against each instance's machine
//!   code;
//! - the **header layout** (where the vtable pointer sits in a task header), read from the
//!   code that uses it rather than from a per-version table;
//! - where a thread keeps the id of the task it polls (`task_context`), so heap events can
//!   be tied to tasks.
//!
//! Heap tracking's own discovery is separate from [`analyze`], run when a process's heap is
//! tracked: the allocator and its probe sites (`alloc`, per process, since it needs the
//! libraries the process maps), the unwind table the kernel walks stacks with
//! (`unwind_table`) and callsite names (`symbolize`), both once per executable.
//!
//! A stripped binary is paired with its separate debug file when there is one (see
//! [`analyze_with_debug_file`]): names and hook points then come from the debug file's
//! symbols, everything else from the binary, so the result is that of the unstripped build.
//!
//! tokio's task internals are private API. Everything here is therefore derived from the
//! binary itself and cross-checked where two independent sources exist, and anything that
//! could not be established is reported in [`TargetImage::warnings`] instead of guessed
//! silently: a wrong hook or label turns into a false leak report.

pub mod alloc;
pub mod budget;
mod debuginfo;
mod disasm;
mod dwarf;
mod dynamic;
mod elf;
#[doc(hidden)]
pub mod fuzzing;
mod hooks;
mod name_index;
mod naming;
mod resolve;
pub mod symbolize;
pub mod task_context;
pub mod task_layout;
pub mod unwind_table;
mod vtables;

mod image;
pub use image::*;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::timing::Phases;
pub use budget::Budget;
pub use dwarf::LineIndex;
pub(crate) use elf::read_bounded;
pub use task_layout::{TaskLayout, VtableLayout};

/// How long [`analyze`] may take on one binary. The fixtures (2 MiB, and 13 MiB with line
/// tables) take about a second each in a debug build on a loaded 2-core host, less in
/// release: this leaves room for services many times their size. Past it the file is
/// corrupted or crafted to be slow, and host-wide mode must move on to the next one.
pub const ANALYSIS_BUDGET: Duration = Duration::from_secs(30);

/// Why a target could not be analysed. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "cannot read {}: {source}; check the path and read permission (for a running process, \
         /proc/<pid>/exe names its executable)",
        .path.display()
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not a regular file; pass the target's executable itself (for a running \
         process: /proc/<pid>/exe)",
        .path.display()
    )]
    NotAFile { path: PathBuf },
    #[error(
        "{} is {size} bytes, more than the {limit} bytes leakscope reads into memory to \
         analyse a binary, so it is not analysed (keep its debug info in a separate file, \
         made with `objcopy --only-keep-debug`, to make it smaller)",
        .path.display()
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(
        "{} is not an ELF file; pass the target's executable itself, not a script or wrapper \
         (for a running process: /proc/<pid>/exe)",
        .path.display()
    )]
    NotElf { path: PathBuf },
    #[error(
        "{} is a {machine} binary; leakscope only supports x86_64 ELF executables",
        .path.display()
    )]
    UnsupportedArch { path: PathBuf, machine: String },
    #[error(
        "{} is a malformed or truncated ELF file ({reason}); make sure the build finished and \
         the file is not being rewritten",
        .path.display()
    )]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "{} does not look like a tokio binary: no task vtables found; point leakscope at the \
         executable that links tokio and spawns tasks (not a launcher or a shared library)",
        .path.display()
    )]
    NoTaskVtables { path: PathBuf },
    #[error(
        "analysis of {} took longer than {} s and was abandoned, so it is not watched; a \
         corrupted or truncated file is the usual cause (if it is a healthy build, please \
         report it with the binary)",
        .path.display(),
        .limit.as_secs_f64()
    )]
    TooSlow { path: PathBuf, limit: Duration },
    #[error(
        "{} is not the debug file of {}: {reason}; use the debug file saved from the same \
         build as the binary (`objcopy --only-keep-debug` of its unstripped original)",
        .debug.display(),
        .path.display()
    )]
    DebugFileMismatch {
        path: PathBuf,
        debug: PathBuf,
        reason: String,
    },
    #[error(
        "{} cannot be used as the debug file of {}: {reason}; pass the file that \
         `objcopy --only-keep-debug` made from the unstripped binary",
        .debug.display(),
        .path.display()
    )]
    InvalidDebugFile {
        path: PathBuf,
        debug: PathBuf,
        reason: String,
    },
}

/// Analyses the executable at `path`, with its separate debug file if one is found the way
/// gdb finds it, within [`ANALYSIS_BUDGET`]. See the module docs and
/// [`analyze_with_debug_file`].
pub fn analyze(path: &Path) -> Result<TargetImage, DiscoveryError> {
    analyze_with_debug_file(path, None)
}

/// Analyses the executable at `path`, taking names, function extents and hook points from
/// the separate debug file `debug` (as made by `objcopy --only-keep-debug`), while code,
/// data, relocations and file offsets come from `path` itself. Within [`ANALYSIS_BUDGET`];
/// see [`analyze_within`].
///
/// The debug file must belong to the binary: equal build-ids when both have one, else the
/// CRC32 in the binary's `.gnu_debuglink`; a mismatch is [`DiscoveryError::DebugFileMismatch`].
///
/// With `debug` = `None` the debug file is looked up as gdb does, in this order:
/// `/usr/lib/debug/.build-id/<xx>/<rest>.debug` by build-id, then the `.gnu_debuglink` name
/// in the binary's directory, in its `.debug/` subdirectory and under
/// `/usr/lib/debug/<directory>/`. Candidates that do not match are skipped; without a debug
/// file a stripped binary is analysed by shape only, with a warning naming the paths searched.
pub fn analyze_with_debug_file(
    path: &Path,
    debug: Option<&Path>,
) -> Result<TargetImage, DiscoveryError> {
    analyze_within(path, debug, Budget::new(ANALYSIS_BUDGET))
}

/// [`analyze_with_debug_file`] within `budget`: past it, the analysis stops at its next
/// step and returns [`DiscoveryError::TooSlow`]. Whatever the file holds, the work is also
/// bounded by its size (at most 1 GiB is read; ranges the headers claim are cut to the
/// bytes that exist; function extents are capped), so the budget is the last guard, not the
/// only one.
///
/// It blocks: a caller on an async runtime runs it on a blocking thread
/// (`tokio::task::spawn_blocking`), so that a slow file delays only its own process.
pub fn analyze_within(
    path: &Path,
    debug: Option<&Path>,
    budget: Budget,
) -> Result<TargetImage, DiscoveryError> {
    let mut phases = Phases::start(format!("analysis of {}", path.display()));
    let mut img = elf::Image::load(path)?;
    img.budget = budget;
    phases.lap("load");
    let debug = debuginfo::attach(path, &mut img, debug)?;
    phases.lap("debug_file");
    analyze_image(path, img, debug, phases)
}

/// Analyses an ELF file held in memory, named `path` in messages and in the result. No
/// separate debug file is looked for: nothing is read from disk. For files that do not
/// come from a path (and for fuzzing).
pub fn analyze_bytes(
    path: &Path,
    data: Vec<u8>,
    budget: Budget,
) -> Result<TargetImage, DiscoveryError> {
    let mut phases = Phases::start(format!("analysis of {}", path.display()));
    let mut img = elf::Image::parse(path, data)?;
    img.budget = budget;
    phases.lap("parse");
    analyze_image(path, img, debuginfo::Outcome::default(), phases)
}

/// The error for an analysis whose budget is spent; checked between phases (the scans
/// themselves only stop early, so a spent budget must never let partial results through).
fn check_budget(path: &Path, img: &elf::Image) -> Result<(), DiscoveryError> {
    if img.budget.spent_now() {
        return Err(DiscoveryError::TooSlow {
            path: path.to_path_buf(),
            limit: img.budget.limit(),
        });
    }
    Ok(())
}

fn analyze_image(
    path: &Path,
    mut img: elf::Image,
    debug: debuginfo::Outcome,
    mut phases: Phases,
) -> Result<TargetImage, DiscoveryError> {
    let stripped = !img.has_symtab;
    let mut warnings = std::mem::take(&mut img.warnings);
    warnings.extend(debug.warnings.iter().cloned());

    let poll_fns: BTreeSet<u64> = if stripped {
        BTreeSet::new()
    } else {
        img.find_functions(vtables::RAW_POLL).into_iter().collect()
    };
    let vtable_layout = if poll_fns.is_empty() {
        VtableLayout::default()
    } else {
        match task_layout::learn_vtable_layout(&img, &poll_fns) {
            Ok(learned) => learned,
            Err(why) => {
                warnings.push(format!(
                    "could not learn the task vtable's layout from the binary ({why}); \
                     looking for tokio ≥ 1.23 records by shape"
                ));
                VtableLayout::default()
            }
        }
    };
    let mut by_shape = stripped;
    let mut raw = if poll_fns.is_empty() || !vtable_layout.from_binary {
        Vec::new()
    } else {
        vtables::find_vtables(&img, &vtable_layout, Some(&poll_fns))
    };
    if raw.is_empty() && !stripped {
        // Symbols present but no `raw::poll` (renamed in some tokio version, or symbols
        // only partially kept): the record shape still identifies vtables.
        raw = vtables::find_vtables(&img, &VtableLayout::default(), None);
        by_shape = true;
        if !raw.is_empty() && poll_fns.is_empty() {
            warnings.push(
                "no tokio::runtime::task::raw::poll symbol found; task vtables were found by \
                 record shape and are not named"
                    .to_string(),
            );
        } else if !raw.is_empty() {
            warnings.push("task vtables were found by record shape and are not named".into());
        }
    } else if stripped {
        raw = vtables::find_vtables(&img, &vtable_layout, None);
    }
    check_budget(path, &img)?;
    phases.lap("vtables");
    if raw.is_empty() {
        return Err(DiscoveryError::NoTaskVtables {
            path: path.to_path_buf(),
        });
    }
    let vtable_layout = if by_shape {
        VtableLayout::default()
    } else {
        vtable_layout
    };
    warnings.extend(vtable_layout.limits());

    let layout = hooks::header_layout(&img, vtable_layout, &mut warnings);
    let hooks = if stripped {
        warnings.push(debug.stripped_warning());
        Vec::new()
    } else {
        let (h, w) = hooks::find_hooks(&img, &layout);
        warnings.extend(w);
        h
    };
    check_budget(path, &img)?;
    phases.lap("hooks");
    let complete_addrs: HashSet<u64> = hooks
        .iter()
        .filter(|h| h.kind == HookKind::Complete)
        .map(|h| h.vaddr)
        .collect();

    let mut walker = disasm::Walker::new(&img);
    let mut memo = vtables::CellMemo::default();
    // Name every vtable from its own code, then narrow the labels across vtables.
    let namings: Vec<Option<vtables::Naming>> = if by_shape {
        vec![None; raw.len()]
    } else {
        let mut n: Vec<vtables::Naming> = raw
            .iter()
            .map(|vt| vtables::name_vtable(&mut walker, &mut memo, vt))
            .collect();
        phases.lap("naming");
        resolve::resolve(&img, &raw, &mut n, &mut warnings);
        phases.lap("resolve");
        n.into_iter().map(Some).collect()
    };
    let mut out = Vec::with_capacity(raw.len());
    let mut future_fns = Vec::new();
    for (vt, named) in raw.iter().zip(namings) {
        let label = format!("vtable@0x{:x}", vt.vaddr);
        if let Some(n) = &named {
            if let Some(note) = &n.note {
                warnings.push(format!("vtable@0x{:x} ({}): {note}", vt.vaddr, n.site));
            }
            if n.method == NamingMethod::StrippedScan {
                warnings.push(format!(
                    "vtable@0x{:x}: no future name found from its poll or dealloc functions",
                    vt.vaddr
                ));
            }
        }
        let complete_hooked =
            hooks::complete_reachable(&mut walker, vt.poll, vt.shutdown, &complete_addrs);
        if let Some(f) = named.as_ref().and_then(|n| n.future_fn) {
            future_fns.push(f);
        }
        out.push((
            TaskVtable {
                vaddr: vt.vaddr,
                poll_fn: vt.poll,
                schedule_fn: vt.schedule.unwrap_or(0),
                dealloc_fn: vt.dealloc,
                shutdown_fn: vt.shutdown,
                site: named.as_ref().map_or(label, |n| n.site.clone()),
                naming: named
                    .as_ref()
                    .map_or(NamingMethod::StrippedScan, |n| n.method),
                location: None,
                complete_hooked,
                scheduler: named.as_ref().and_then(|n| n.scheduler),
                blocking: named.as_ref().is_some_and(|n| n.blocking),
                trailer_offset: vt.offsets.map_or(0, |o| o[0]),
                scheduler_offset: vt.offsets.map_or(0, |o| o[1]),
                id_offset: vt.offsets.map_or(0, |o| o[2]),
            },
            named.and_then(|n| n.future_fn),
        ));
    }

    check_budget(path, &img)?;
    phases.lap("completions");
    match dwarf::line_locations(&img, &future_fns) {
        Ok(locs) => {
            for (vt, f) in &mut out {
                vt.location = f.and_then(|f| locs.get(&f).cloned());
            }
        }
        Err(e) => warnings.push(format!("could not read DWARF line info: {e}")),
    }

    phases.lap("dwarf");
    let mut vtables: Vec<TaskVtable> = out.into_iter().map(|(v, _)| v).collect();
    vtables.sort_by_key(|v| v.vaddr);
    unify_generic_spellings(&mut vtables);

    warnings.extend(hooks::spawn_coverage_warnings(&hooks, &vtables));
    let mut hooks = hooks;
    if !stripped {
        hooks.extend(hooks::first_poll_hooks(&img, &hooks, &vtables));
    }
    let current_task_slot = task_context::find_current_task_slot(&img);
    let next_task_id = NEXT_TASK_ID_STATICS
        .iter()
        .find_map(|name| img.data_symbol(name));
    if !complete_addrs.is_empty() {
        let unhooked: Vec<&str> = vtables
            .iter()
            .filter(|v| !v.complete_hooked)
            .map(|v| v.site.as_str())
            .collect();
        if !unhooked.is_empty() {
            warnings.push(format!(
                "{} task vtable(s) reach no Harness::complete hook (inlined for them), so their \
                 completions are not observed: {}",
                unhooked.len(),
                unhooked.join(", ")
            ));
        }
    }

    check_budget(path, &img)?;
    phases.lap("first_poll_hooks");
    phases.finish();
    Ok(TargetImage {
        path: path.to_path_buf(),
        build_id: img.build_id.clone(),
        stripped,
        debug_file: debug.file,
        vtables,
        hooks,
        layout,
        warnings,
        segments: img.segments.clone(),
        current_task_slot,
        next_task_id,
        needed_libraries: dynamic::needed_libraries(&img.data),
        tasks_unreadable: None,
    })
}

/// The image of a tokio binary whose tasks cannot be read (`why`: what could not be
/// learned), for heap tracking alone: no vtables and no task hooks, but its segments,
/// build-id, debug file and needed libraries, which heap tracking needs; its one warning
/// says what is missing. Heap tracking needs no task layout, so it never depends on task
/// discovery.
pub fn analyze_heap_only(path: &Path, why: &str) -> Result<TargetImage, DiscoveryError> {
    let mut img = elf::Image::load(path)?;
    img.budget = Budget::new(ANALYSIS_BUDGET);
    let debug = debuginfo::attach(path, &mut img, None)?;
    let mut warnings = std::mem::take(&mut img.warnings);
    warnings.extend(debug.warnings.iter().cloned());
    Ok(TargetImage {
        path: path.to_path_buf(),
        build_id: img.build_id.clone(),
        stripped: !img.has_symtab,
        debug_file: debug.file,
        warnings,
        segments: img.segments.clone(),
        needed_libraries: dynamic::needed_libraries(&img.data),
        ..TargetImage::default()
    }
    .with_tasks_unreadable(why))
}

/// One spelling per spawn site. A generic function's futures are named by their poll
/// function with the impl's parameter names (`WithGracefulShutdown<L,M,S,F>::run::…`) and
/// by their drop glue with the concrete types spelled out: two labels for one place in the
/// source, which an alert matcher written for one would miss. Labels equal without their
/// generic arguments take the shortest spelling (the parameter names, when present).
fn unify_generic_spellings(vtables: &mut [TaskVtable]) {
    let unifiable = |site: &str| site.contains('<') && !site.contains(" | ");
    let mut shortest: std::collections::HashMap<String, String> = Default::default();
    for vtable in vtables.iter().filter(|v| unifiable(&v.site)) {
        let spelling = shortest
            .entry(naming::strip_generics(&vtable.site))
            .or_insert_with(|| vtable.site.clone());
        if (vtable.site.len(), &vtable.site) < (spelling.len(), &*spelling) {
            *spelling = vtable.site.clone();
        }
    }
    for vtable in vtables.iter_mut().filter(|v| unifiable(&v.site)) {
        if let Some(spelling) = shortest.get(&naming::strip_generics(&vtable.site)) {
            vtable.site.clone_from(spelling);
        }
    }
}

/// tokio's task id counter, by the paths it has had.
const NEXT_TASK_ID_STATICS: [&str; 2] = [
    "tokio::runtime::task::id::Id::next::NEXT_ID",
    "tokio::runtime::task::Id::next::NEXT_ID",
];

#[cfg(test)]
mod tests;

//! Turns heap tracking on for one process: unwind table into the kernel, per-process
//! settings, allocator hooks, and the userspace ledger entry, undone again on exit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use monitor_common::heap::{HeapTarget, UNWIND_BUCKETS_MAX, UNWIND_ROWS_MAX};

use crate::bpf::attach::AttachedLink;
use crate::bpf::loader::Probes;
use crate::bpf::plan::{self, HeapAttachPoint};
use crate::discovery::TargetImage;
use crate::discovery::alloc;
use crate::discovery::symbolize::Symbolizer;
use crate::discovery::unwind_table;
use crate::state::heap::{HeapLedger, ProcessHeap};
use crate::targets::procfs::{ExeIdentity, ProcessInfo};
use crate::timing::Phases;

/// How allocations are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeapMode {
    /// No allocator hooks: task tracking only.
    Off,
    /// Every allocation and free of the process is seen.
    Exact,
    /// 1 in 16 blocks (chosen by address) is tracked and its figures scaled by 16: the
    /// probes still fire on every allocation, but skip the stack walk and the bookkeeping
    /// for the others (a third less per allocation, measured: the traps remain).
    Sampled,
    /// No allocator hooks until the process's anonymous memory grows in a way its task
    /// counts do not explain; then exact tracking for a bounded window, the window's
    /// blocks followed with the free hook alone, and every hook off again
    /// (`daemon::heap_window`). Cheap enough to leave on.
    Adaptive,
}

impl HeapMode {
    /// `log2` of the sampling period.
    pub const fn sample_shift(self) -> u32 {
        match self {
            HeapMode::Sampled => 4,
            _ => 0,
        }
    }

    /// Whether the kernel's heap maps and ring are needed.
    pub const fn tracks(self) -> bool {
        !matches!(self, HeapMode::Off)
    }
}

/// How the heap probes report what they see, in `exact` and `sampled` modes alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeapPath {
    /// Live figures per (callsite, task site) kept in the kernel, read periodically; an
    /// event only for each new group. Exact, and the daemon's cost no longer grows with
    /// the allocation rate.
    #[default]
    Aggregate,
    /// One event per allocation and per free, applied by the daemon (the older path, kept
    /// to check the aggregates against).
    Events,
}

/// Per-executable state shared by all processes running it.
struct ExeHeapInfo {
    text_start: u64,
    unwind_first: u32,
    unwind_rows: u32,
    bucket_first: u32,
    buckets: u32,
    symbolizer: Arc<Symbolizer>,
}

/// Heap state across processes, owned by the daemon's process registry.
pub struct HeapTracker {
    pub ledger: Arc<Mutex<HeapLedger>>,
    mode: HeapMode,
    /// Offset of `thread.fsbase` in `task_struct`; 0 disables task attribution.
    fsbase_offset: u64,
    exes: HashMap<ExeIdentity, ExeHeapInfo>,
    next_unwind_row: u32,
    next_bucket: u32,
    /// Live heap aggregated in the kernel (see `crate::bpf::heap_aggregates`) rather than
    /// one event per allocation and free.
    aggregate: bool,
}

impl HeapTracker {
    pub fn new(ledger: Arc<Mutex<HeapLedger>>, mode: HeapMode) -> Self {
        let fsbase_offset = match crate::bpf::kernel_btf::task_struct_fsbase_offset() {
            Ok(offset) => offset,
            Err(err) => {
                log::warn!("{err}: allocations will not be attributed to tokio tasks");
                0
            }
        };
        Self {
            ledger,
            mode,
            fsbase_offset,
            exes: HashMap::new(),
            next_unwind_row: 0,
            next_bucket: 0,
            aggregate: true,
        }
    }

    /// Chooses how the probes report (by default, aggregated in the kernel).
    pub fn with_path(mut self, path: HeapPath) -> Self {
        self.aggregate = path == HeapPath::Aggregate;
        self
    }

    fn exe_info(
        &mut self,
        probes: &mut Probes,
        process: &ProcessInfo,
        image: &TargetImage,
    ) -> anyhow::Result<&ExeHeapInfo> {
        if !self.exes.contains_key(&process.exe) {
            let exe = process.exe_link();
            let mut phases = Phases::start(format!("heap tables of {}", exe.display()));
            let mut table = unwind_table::build(&exe)
                .with_context(|| format!("building the unwind table of {}", exe.display()))?;
            phases.lap("unwind_table");
            // Line tables from the debug file discovery used, if it used one.
            let symbolizer = Arc::new(
                Symbolizer::load(&exe, image.debug_file.as_deref())
                    .with_context(|| format!("reading symbols of {}", exe.display()))?,
            );
            phases.lap("symbols");
            // The walk in the kernel ends at the frame the callsite rule picks.
            table.mark_callsite_code(&symbolizer.callsite_code());
            phases.lap("callsite_code");
            let rows = u32::try_from(table.rows().len()).unwrap_or(u32::MAX);
            let buckets = u32::try_from(table.buckets().len()).unwrap_or(u32::MAX);
            if rows > UNWIND_ROWS_MAX || buckets > UNWIND_BUCKETS_MAX {
                // One large service is enough (about 23 MB of code): say so rather than
                // blame the number of executables.
                bail!(
                    "the executable's unwind table has {rows} rows and {buckets} index \
                     entries, more than the kernel's table holds ({UNWIND_ROWS_MAX} rows, \
                     {UNWIND_BUCKETS_MAX} entries): heap tracking does not fit an executable \
                     this large"
                );
            }
            if self.next_unwind_row.saturating_add(rows) > UNWIND_ROWS_MAX
                || self.next_bucket.saturating_add(buckets) > UNWIND_BUCKETS_MAX
            {
                bail!(
                    "no room for {rows} more unwind rows ({} of {UNWIND_ROWS_MAX} used) and \
                     {buckets} index entries ({} of {UNWIND_BUCKETS_MAX} used): too many \
                     distinct executables watched with heap tracking",
                    self.next_unwind_row,
                    self.next_bucket
                );
            }
            probes.load_unwind_rows(self.next_unwind_row, table.rows())?;
            probes.load_unwind_buckets(self.next_bucket, table.buckets())?;
            phases.lap("load_maps");
            phases.finish();
            self.exes.insert(
                process.exe,
                ExeHeapInfo {
                    text_start: table.text_range.0,
                    unwind_first: self.next_unwind_row,
                    unwind_rows: rows,
                    bucket_first: self.next_bucket,
                    buckets: buckets.saturating_sub(1),
                    symbolizer,
                },
            );
            self.next_unwind_row += rows;
            self.next_bucket += buckets;
        }
        Ok(&self.exes[&process.exe])
    }

    /// Starts tracking `process`; returns the links to detach when it goes away.
    pub fn attach(
        &mut self,
        probes: &mut Probes,
        process: &ProcessInfo,
        image: &TargetImage,
        load_bias: u64,
    ) -> anyhow::Result<Vec<AttachedLink>> {
        let mut phases = Phases::start(format!("heap attach of pid {}", process.pid));
        let points = Self::points(process)?;
        phases.lap("allocator");
        let links = self.attach_at(probes, process, image, load_bias, &points);
        phases.lap("tables_and_probes");
        phases.finish();
        links
    }

    /// Where `process`'s heap probes go (its allocator found in its executable and
    /// libraries): worth keeping by a caller that attaches the same process again.
    pub fn points(process: &ProcessInfo) -> anyhow::Result<Vec<HeapAttachPoint>> {
        let pid = process.pid;
        let allocators = alloc::find_allocators(
            &process.exe_link(),
            &crate::targets::maps::mapped_libraries(pid),
        )
        .with_context(|| format!("finding the allocator of pid {pid}"))?;
        let points = plan::heap_points(&allocators);
        if points.is_empty() {
            bail!("pid {pid}: no allocator entry points found to probe");
        }
        for point in &points {
            log::debug!(
                "pid {pid}: {} at {} offset {:#x} ({})",
                point.program.name(),
                point.target.display(),
                point.file_offset,
                point.symbol
            );
        }
        Ok(points)
    }

    /// [`HeapTracker::attach`] at `points` found before (see [`HeapTracker::points`]).
    pub fn attach_at(
        &mut self,
        probes: &mut Probes,
        process: &ProcessInfo,
        image: &TargetImage,
        load_bias: u64,
        points: &[HeapAttachPoint],
    ) -> anyhow::Result<Vec<AttachedLink>> {
        let pid = process.pid;
        let fsbase_offset = self.fsbase_offset;
        let sample_shift = self.mode.sample_shift();
        let aggregate = u32::from(self.aggregate);
        let exe = self.exe_info(probes, process, image)?;
        let target = HeapTarget {
            load_bias,
            task_slot_fs_offset: image
                .current_task_slot
                .as_ref()
                .map(|s| s.fs_offset)
                .unwrap_or(0),
            fsbase_offset,
            text_start: exe.text_start,
            unwind_first: exe.unwind_first,
            unwind_rows: exe.unwind_rows,
            bucket_first: exe.bucket_first,
            buckets: exe.buckets,
            sample_shift,
            aggregate,
        };
        let symbolizer = exe.symbolizer.clone();
        let heap = ProcessHeap::new(
            pid,
            process.exe_name(),
            load_bias,
            symbolizer,
            1 << sample_shift,
        )
        .with_tasks_unread(image.tasks_unreadable.is_some());
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_process(if self.aggregate {
                heap.aggregated()
            } else {
                heap
            });
        probes.set_heap_target(pid, Some(target))?;
        match probes.attach_heap(pid, points) {
            Ok(links) => Ok(links),
            Err(err) => {
                self.detach(probes, pid);
                Err(err.into())
            }
        }
    }

    /// Forgets a process (exited or detached).
    pub fn detach(&mut self, probes: &mut Probes, pid: u32) {
        let _ = probes.set_heap_target(pid, None);
        match probes.purge_heap_blocks(pid) {
            Ok(n) => log::debug!("pid {pid}: dropped {n} outstanding blocks"),
            Err(err) => log::warn!("pid {pid}: could not drop its outstanding blocks: {err}"),
        }
        if let Err(err) = probes.purge_heap_groups(pid) {
            log::warn!("pid {pid}: could not drop its heap groups: {err}");
        }
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove_process(pid);
    }
}

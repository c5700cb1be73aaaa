//! What discovery learns about one executable ([`TargetImage`]) and the parts it is made
//! of: task vtables, hook points, the registers that carry a task header, load segments.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::{TaskLayout, elf, task_context};

/// Everything discovery learned about one executable.
///
/// `Default` exists so tests elsewhere can build an image with `..Default::default()`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetImage {
    pub path: PathBuf,
    /// Hex of `NT_GNU_BUILD_ID`, to check that a running process maps this exact file.
    pub build_id: Option<String>,
    /// No symbol table, neither in the file nor in a separate debug file: vtables are found
    /// by shape only, labels are `vtable@0x…`, and no hook points can be found by name.
    pub stripped: bool,
    /// The separate debug file whose symbols (and DWARF) were used, normally because the
    /// binary itself is stripped (see [`analyze_with_debug_file`]).
    pub debug_file: Option<PathBuf>,
    /// Sorted by `vaddr`.
    pub vtables: Vec<TaskVtable>,
    pub hooks: Vec<HookPoint>,
    /// tokio's task layout in this binary (header and vtable), as learned from its code.
    pub layout: TaskLayout,
    /// Everything that could not be established and what it means for the results.
    pub warnings: Vec<String>,
    /// The file's `PT_LOAD` segments, kept for [`TargetImage::file_offset`].
    pub segments: Vec<LoadSegment>,
    /// Where a thread keeps the id of the task it polls, for heap attribution.
    pub current_task_slot: Option<task_context::CurrentTaskSlot>,
    /// Link-time address of tokio's task id counter (`Id::next::NEXT_ID`), read when a
    /// running process is attached: tasks whose id is below its value then were spawned
    /// before attach (a first-poll hook sees them only when next polled).
    pub next_task_id: Option<u64>,
    /// Sonames of the libraries the executable needs (`DT_NEEDED`): all mapped means the
    /// dynamic loader is done with them (`targets::loader_done`).
    pub needed_libraries: Vec<String>,
    /// Why this binary's tokio tasks cannot be read, when they cannot (see
    /// [`analyze_heap_only`] and [`TargetImage::with_tasks_unreadable`]): no task hook is
    /// placed for it, and only its heap is tracked.
    pub tasks_unreadable: Option<String>,
}

impl TargetImage {
    /// The vtable record starting exactly at `vaddr` (a link-time address: subtract the
    /// process's load bias from a pointer read at run time first).
    pub fn vtable_at(&self, vaddr: u64) -> Option<&TaskVtable> {
        self.vtables
            .binary_search_by_key(&vaddr, |v| v.vaddr)
            .ok()
            .map(|i| &self.vtables[i])
    }

    /// Convert a link-time virtual address into the file offset (for uprobe attach), through
    /// the `PT_LOAD` segment that maps it from the file.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        elf::segment_file_offset(&self.segments, vaddr)
    }

    /// Link-time address at which the mapping of file offset 0 starts (0 for PIE, e.g.
    /// 0x400000 for a classic non-PIE executable). A runtime address `r` in the process
    /// corresponds to the link-time address `r - mapping_start + link_base()`, where
    /// `mapping_start` is where `/proc/<pid>/maps` shows offset 0 of the executable.
    pub fn link_base(&self) -> u64 {
        const PAGE_MASK: u64 = !0xfff;
        self.segments
            .iter()
            .find(|s| s.file_offset == 0)
            .map(|s| s.vaddr & PAGE_MASK)
            .or_else(|| {
                self.segments
                    .iter()
                    .map(|s| s.vaddr.saturating_sub(s.file_offset) & PAGE_MASK)
                    .min()
            })
            .unwrap_or(0)
    }

    /// This image for heap tracking only: its tasks cannot be read (`why`: what could not
    /// be learned), so no task hook is placed; one warning says so.
    pub fn with_tasks_unreadable(mut self, why: &str) -> Self {
        let warning = format!(
            "the tokio tasks of this binary cannot be read ({why}): its heap is tracked, but \
             task counts and spawn sites are not available for it, and its allocations are \
             not tied to the task that made them"
        );
        self.warnings.push(warning.clone());
        self.tasks_unreadable = Some(warning);
        self
    }

    /// Hook points of one kind.
    pub fn hooks_of(&self, kind: HookKind) -> impl Iterator<Item = &HookPoint> {
        self.hooks.iter().filter(move |h| h.kind == kind)
    }
}

/// One tokio task vtable, i.e. one (future type, scheduler) spawn site.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskVtable {
    /// Link-time address of the vtable record.
    pub vaddr: u64,
    pub poll_fn: u64,
    pub schedule_fn: u64,
    pub dealloc_fn: u64,
    pub shutdown_fn: u64,
    /// Site label, e.g. `axum_app::leak_forever::{{closure}}::{{closure}}`, hashes stripped.
    /// For `spawn_blocking` tasks it is the closure passed in (the `F` of `BlockingTask<F>`).
    /// Candidates that identical code folding made indistinguishable are joined with `" | "`.
    pub site: String,
    /// How `site` was found.
    pub naming: NamingMethod,
    /// `path:line` of the future's poll function from DWARF line info, when present.
    pub location: Option<String>,
    /// A [`HookKind::Complete`] hook point is reachable from this vtable's poll *and*
    /// shutdown functions. When false, completions of this site are not observed and its
    /// tasks must not be reported as leaks on that basis.
    pub complete_hooked: bool,
    /// Which scheduler the vtable belongs to, when the binary says.
    pub scheduler: Option<Scheduler>,
    /// A `spawn_blocking` task.
    pub blocking: bool,
    /// Offsets stored in the vtable: from the header to the trailer, to the scheduler and to
    /// the task id (`u64` at `header + id_offset`). All 0 when the binary's vtables carry no
    /// offsets (tokio < 1.23, see [`VtableLayout::offsets`]); `schedule_fn` is 0 when they
    /// have no schedule entry.
    pub trailer_offset: u64,
    pub scheduler_offset: u64,
    pub id_offset: u64,
}

/// How a vtable's site label was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum NamingMethod {
    /// The future's own poll function, reached by following calls from the vtable's `poll`
    /// entry through runtime glue. Exact, and survives identical code folding of drop glue.
    FuturePollCall,
    /// The `T` of `drop_in_place<…Cell<T, S>>` reached from the vtable's functions (or of
    /// `raw::poll::<T, S>` in v0-mangled builds): used when the future's poll was inlined
    /// into the glue.
    CellDropGlue,
    /// No name recovered; label `vtable@0x<vaddr hex>`. Normally a stripped binary, where
    /// vtables are found by record shape. Also used (with a warning) in the rare case that
    /// symbols exist but neither method produced a name.
    #[default]
    StrippedScan,
}

/// A uprobe attach point.
#[derive(Debug, Clone, Serialize)]
pub struct HookPoint {
    pub kind: HookKind,
    /// Demangled name, hash stripped.
    pub symbol: String,
    pub vaddr: u64,
    /// Offset in the file for uprobe attachment.
    pub file_offset: u64,
    /// Argument register that holds the task header pointer on entry.
    pub header_arg: ArgReg,
    /// `header_arg` was confirmed by this instance's code (header-only uses of the
    /// register's entry value), not just assumed from the ABI.
    pub header_arg_verified: bool,
    /// Schedulers this instance serves, from its own name (v0 mangling) or its callers'
    /// (`current_thread::Handle::spawn`, `multi_thread::Handle::bind_new_task`). `bind_inner`
    /// is instantiated per scheduler type, but identical code folding can merge the
    /// instances (tokio 1.47 fixture: one address serves both). Empty when unknown.
    pub schedulers: Vec<Scheduler>,
}

/// What a hook point observes. The register holding the header pointer is in
/// [`HookPoint::header_arg`]; the values below are what tokio 1.47 and 1.54 release
/// builds use, each confirmed by disassembly of the fixtures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HookKind {
    /// `tokio::runtime::task::list::OwnedTasks<S>::bind_inner`: the new task's header
    /// pointer is in the 2nd argument register (rsi). rdx (`notified`) points at the same
    /// header. One instance per scheduler type, unless identical code folding merged them.
    SpawnOwned,
    /// `tokio::runtime::blocking::pool::Spawner::spawn_task(&self, task: Task, rt: &Handle)`:
    /// a `spawn_blocking` task. `Task { task: UnownedTask, mandatory }` is passed by value as
    /// a (pointer, u8) scalar pair, so the header pointer is in rsi (rdi = `&self`,
    /// dl = mandatory, rcx = `rt`; the `Result` returns in rax:rdx, no hidden sret pointer).
    SpawnBlocking,
    /// `tokio::runtime::task::harness::Harness<T,S>::complete`: header pointer in rdi
    /// (arg0). Called once per task when its future finished or was cancelled.
    Complete,
    /// A task vtable's `poll` fn (`raw::poll<T,S>`, header in rdi), hooked only for task
    /// types whose spawn path reaches no spawn hook (inlined `bind_inner`): the first poll
    /// of each task stands in for its spawn. Costs one hit per poll of those types.
    FirstPoll,
}

/// A System V integer argument register (entry value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgReg {
    Rdi,
    Rsi,
    Rdx,
    Rcx,
    R8,
    R9,
}

impl ArgReg {
    /// In argument order; `ArgReg as usize` indexes this.
    pub const ALL: [ArgReg; 6] = [
        ArgReg::Rdi,
        ArgReg::Rsi,
        ArgReg::Rdx,
        ArgReg::Rcx,
        ArgReg::R8,
        ArgReg::R9,
    ];

    /// 0-based argument position (`PT_REGS_PARM{n+1}`).
    pub fn position(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ArgReg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArgReg::Rdi => "rdi",
            ArgReg::Rsi => "rsi",
            ArgReg::Rdx => "rdx",
            ArgReg::Rcx => "rcx",
            ArgReg::R8 => "r8",
            ArgReg::R9 => "r9",
        })
    }
}

/// tokio scheduler a task or hook belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    CurrentThread,
    MultiThread,
    /// The blocking pool (`spawn_blocking`).
    Blocking,
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::CurrentThread => "current_thread",
            Scheduler::MultiThread => "multi_thread",
            Scheduler::Blocking => "blocking",
        })
    }
}

/// A `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub mem_size: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub executable: bool,
}

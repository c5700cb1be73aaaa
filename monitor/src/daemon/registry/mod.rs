//! The processes the daemon is attached to: attaching one registers it with every ledger,
//! places its task and heap probes and marks it ready, all in one step (undone as a whole on
//! failure); detaching undoes the same in one step when it exits. Host-wide mode's side
//! (judging, selecting, limits) is in `host`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod host;

use anyhow::Context as _;
use log::{info, warn};

use super::census::TaskMode;
use super::heap::HeapTracker;
use super::heap_window::HeapWindows;
use super::judge::{Judge, analyze_for_attach};
use crate::bpf::attach::AttachedLink;
use crate::bpf::loader::Probes;
use crate::bpf::plan;
use crate::discovery::{self, TargetImage};
use crate::state::tasks::{ProcessTasks, TaskLedger};
use crate::targets::procfs::{self, ExeIdentity, ProcessInfo};
use crate::targets::workload::{self, NodeFiles, Workload, Workloads};
use crate::targets::{self, ExeTargets, HostScan, HostScanStats};
use host::Consideration;

/// A process the daemon is attached to, and its probes.
struct AttachedProcess {
    info: ProcessInfo,
    links: Vec<AttachedLink>,
    /// CLOCK_MONOTONIC when it was registered (see `ProcessTasks::registered_ns`).
    registered_ns: u64,
}

/// Processes the daemon is attached to, keyed by pid, with their analysed executables
/// cached by executable identity.
pub struct ProcessRegistry {
    probes: Probes,
    images: HashMap<ExeIdentity, Arc<TargetImage>>,
    attached: HashMap<u32, AttachedProcess>,
    ledger: Arc<Mutex<TaskLedger>>,
    heap: Option<HeapTracker>,
    /// `--heap adaptive`: heap probes go on in windows only, placed by this.
    heap_windows: Option<HeapWindows>,
    /// Task hooks placed on `--exe` executables, covering all their processes, and when.
    exe_links: HashMap<ExeIdentity, (Vec<AttachedLink>, Instant)>,
    /// Host-wide mode: executables not watched, and why (`HostScanStats::executables_skipped`).
    not_services: HashMap<ExeIdentity, &'static str>,
    /// Host-wide mode: processes (pid, start time) that could not be attached.
    failed: HashSet<(u32, u64)>,
    /// The unit, container and pod of each attached process, for the exports' labels.
    workloads: Workloads,
    node: NodeFiles,
    /// Processes seen at exec, waiting for their loader: when the report came in, and
    /// when the kernel ran the exec (CLOCK_MONOTONIC ns).
    fresh: HashMap<u32, (Instant, u64)>,
    /// Host-wide mode: processes (pid, start time) left alone by `--include`/`--exclude`.
    excluded: HashSet<(u32, u64)>,
    /// Host-wide mode: judges new executables off the daemon's loop.
    judge: Judge,
    /// Host-wide mode: executables whose task hooks it placed (removed again when none of
    /// their processes is attached; `--exe` targets' stay).
    host_executables: HashSet<ExeIdentity>,
    /// Host-wide mode: at most this many processes are attached at once.
    max_processes: usize,
    /// Host-wide mode: processes (pid, start time) not attached because `max_processes`
    /// were; tried again when one exits.
    over_limit: HashSet<(u32, u64)>,
    /// `TaskMode::Census`: no task hook is placed anywhere; the census counts the tasks.
    task_mode: TaskMode,
}

/// Where task hooks are placed for a process.
#[derive(Debug, Clone, Copy)]
enum TaskHookScope {
    /// In this process only (`--pid`).
    Process,
    /// On the executable, for all processes running it (`--exe`).
    Executable,
}

impl ProcessRegistry {
    /// A registry with no process attached yet; `images` holds executables analysed
    /// already (the daemon analyses every target before loading anything).
    pub fn new(
        probes: Probes,
        images: HashMap<ExeIdentity, Arc<TargetImage>>,
        ledger: Arc<Mutex<TaskLedger>>,
        heap: Option<HeapTracker>,
        node: NodeFiles,
        max_processes: usize,
    ) -> Self {
        Self {
            probes,
            images,
            attached: HashMap::new(),
            ledger,
            heap,
            heap_windows: None,
            exe_links: HashMap::new(),
            not_services: HashMap::new(),
            failed: HashSet::new(),
            workloads: Workloads::default(),
            node,
            fresh: HashMap::new(),
            excluded: HashSet::new(),
            max_processes,
            over_limit: HashSet::new(),
            host_executables: HashSet::new(),
            judge: Judge::default(),
            task_mode: TaskMode::Hooks,
        }
    }

    /// `--tasks census`: processes attached from now on get no task hook (set before any
    /// is attached).
    pub fn set_task_mode(&mut self, mode: TaskMode) {
        self.task_mode = mode;
    }

    /// `--heap adaptive`: processes get no heap probe when attached; `windows` places
    /// them when its signals ask for them (see [`ProcessRegistry::tick_heap_windows`]).
    pub fn set_heap_windows(&mut self, windows: HeapWindows) {
        self.heap_windows = Some(windows);
    }

    /// `--heap adaptive`: one step of the windows at `t` seconds since the session
    /// started; `alive` is each process's live task count.
    pub fn tick_heap_windows(&mut self, t: f64, alive: &HashMap<u32, u64>) {
        if let (Some(windows), Some(heap)) = (&mut self.heap_windows, &mut self.heap) {
            windows.tick(&mut self.probes, heap, t, alive);
        }
    }

    /// `--heap adaptive`: ends the window phases that are over (between samples).
    pub fn advance_heap_windows(&mut self) {
        if let (Some(windows), Some(heap)) = (&mut self.heap_windows, &mut self.heap) {
            windows.advance_all(&mut self.probes, heap);
        }
    }

    /// The unit, container and pod of each attached process.
    pub fn workloads(&self) -> Workloads {
        self.workloads.clone()
    }

    fn image_for(&mut self, process: &ProcessInfo) -> anyhow::Result<Arc<TargetImage>> {
        if let Some(image) = self.images.get(&process.exe) {
            return Ok(image.clone());
        }
        let image = Arc::new(analyze_for_attach(
            &process.exe_link(),
            &format!("{} (pid {})", process.exe_path.display(), process.pid),
            self.heap.is_some(),
        )?);
        for warning in &image.warnings {
            warn!("{}: {warning}", process.exe_path.display());
        }
        self.images.insert(process.exe, image.clone());
        Ok(image)
    }

    /// Attaches to `pid` with per-process task hooks (`--pid`), once it has settled (see
    /// `targets::SETTLE_BEFORE_ATTACH`).
    pub fn attach(&mut self, pid: u32) -> anyhow::Result<()> {
        let info = procfs::process_info(pid)?;
        let image = self.image_for(&info)?;
        targets::wait_settled(&info, &image.needed_libraries);
        self.attach_with(pid, TaskHookScope::Process, None)
    }

    /// Places the task hooks of an `--exe` target on its file: a uprobe lives on the file's
    /// inode, so once placed it reports every process that runs the file, from its exec on.
    /// Events of processes not registered yet are held and replayed (see
    /// `state::pending::PendingEvents`), so the tasks a service spawns as it starts are counted.
    pub fn watch_executable(&mut self, path: &Path, exe: ExeIdentity) -> anyhow::Result<()> {
        let image = self.images[&exe].clone();
        if image.tasks_unreadable.is_some() {
            info!(
                "watching {}: heap only, its tasks cannot be read",
                path.display()
            );
            return Ok(());
        }
        if self.task_mode == TaskMode::Census {
            info!(
                "watching {}: no task hooks (--tasks census), its processes' tasks are \
                 counted by the census",
                path.display()
            );
            return Ok(());
        }
        let links = self
            .probes
            .attach_tasks(&image, path, None)
            .with_context(|| format!("placing task hooks on {}", path.display()))?;
        info!(
            "watching {}: {} hook points on the executable, {} spawn sites known",
            path.display(),
            links.len(),
            image.vtables.len()
        );
        self.exe_links.insert(exe, (links, Instant::now()));
        Ok(())
    }

    /// tokio's next task id in process `pid` now, if the process may have tasks that no
    /// hook saw spawn: it runs since before its hooks were placed. `None` when the binary
    /// has no such counter leakscope knows or it cannot be read (then a first poll of an
    /// old task still counts as a spawn, as before), or when every task was seen from exec.
    fn first_task_id_after_attach(
        &self,
        info: &ProcessInfo,
        image: &TargetImage,
        load_bias: u64,
        scope: TaskHookScope,
    ) -> Option<u64> {
        if let TaskHookScope::Executable = scope
            && let Some((_, placed)) = self.exe_links.get(&info.exe)
            && procfs::age(info).is_some_and(|age| age < placed.elapsed())
        {
            return None;
        }
        let counter = image.next_task_id?.wrapping_add(load_bias);
        match procfs::read_u64(info.pid, counter) {
            Ok(next) => Some(next),
            Err(err) => {
                warn!(
                    "pid {}: {err}; tasks spawned before attach may count as spawned when \
                     first polled",
                    info.pid
                );
                None
            }
        }
    }

    /// Registers `pid`, a process of an `--exe` target (its task hooks are on the
    /// executable already), and places its heap probes.
    fn attach_exe_process(&mut self, pid: u32) -> anyhow::Result<()> {
        self.attach_with(pid, TaskHookScope::Executable, None)
    }

    /// `workload`: the process's, when the caller has learned it already.
    fn attach_with(
        &mut self,
        pid: u32,
        scope: TaskHookScope,
        workload: Option<Workload>,
    ) -> anyhow::Result<()> {
        if self.attached.contains_key(&pid) {
            return Ok(());
        }
        let info = procfs::process_info(pid)?;
        let image = self.image_for(&info)?;
        let mapping_start = procfs::exe_mapping_start(&info)?;
        let load_bias = mapping_start.wrapping_sub(image.link_base());
        // Registered before the probes go in, so the first events already find their process;
        // tasks spawned until now are told apart by their ids.
        let mut process = ProcessTasks::new(pid, info.exe_name(), image.clone(), load_bias);
        let registered_ns = procfs::monotonic_ns();
        process.registered_ns = registered_ns;
        process.first_task_id_after_attach =
            self.first_task_id_after_attach(&info, &image, load_bias, scope);
        process.census_only = self.task_mode == TaskMode::Census;
        if process.census_only && process.first_task_id_after_attach.is_none() {
            // The census cannot tell old tasks from new without it (see `census_target`).
            warn!(
                "pid {pid}: --tasks census: tokio's task id counter is not known in this \
                 binary, so no census runs and its tasks are not counted; use --tasks hooks"
            );
        }
        say_tasks_before_attach(pid, process.first_task_id_after_attach);
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_process(process);
        let task_links = match scope {
            // Heap tracking only (its warning, logged with the image's, says why).
            _ if image.tasks_unreadable.is_some() => Ok(Vec::new()),
            // The census counts the tasks (`state::tasks::census_only`).
            _ if self.task_mode == TaskMode::Census => Ok(Vec::new()),
            TaskHookScope::Process => self
                .probes
                .attach_tasks(&image, &info.exe_link(), Some(pid)),
            // Placed on the executable when the daemon started (`watch_executable`).
            TaskHookScope::Executable => Ok(Vec::new()),
        };
        let task_hooks = task_links.as_ref().map_or(0, Vec::len);
        let attached = task_links
            .map_err(anyhow::Error::from)
            .and_then(|mut links| {
                if let Some(windows) = &mut self.heap_windows {
                    windows.watch(&info, image.clone(), load_bias);
                } else if let Some(heap) = &mut self.heap {
                    match heap.attach(&mut self.probes, &info, &image, load_bias) {
                        Ok(heap_links) => links.extend(heap_links),
                        Err(err) => {
                            self.probes.detach(links);
                            return Err(err);
                        }
                    }
                }
                Ok(links)
            });
        match attached {
            Ok(links) => {
                // Every task with a smaller id may have been spawned before its hook went
                // in: the census takes in those no hook saw.
                let boundary = image
                    .next_task_id
                    .and_then(|link| procfs::read_u64(pid, link.wrapping_add(load_bias)).ok());
                let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(next) = boundary
                    && ledger
                        .process(pid)
                        .is_some_and(|p| p.first_task_id_after_attach.is_some())
                {
                    ledger.set_census_boundary(pid, next);
                }
                let exe_wide = self
                    .exe_links
                    .get(&info.exe)
                    .map_or(0, |(links, _)| links.len());
                ledger.mark_probes_ready(pid, (task_hooks + exe_wide) as u64);
                drop(ledger);
                let workload = workload.unwrap_or_else(|| workload::of_process(pid, &self.node));
                let labels = workload.labels();
                self.workloads.set(pid, workload);
                info!(
                    "attached to pid {pid} ({}{}): {} hook points in the process, {} on its \
                     executable, {} spawn sites known, tasks counted by {}",
                    info.exe_path.display(),
                    labels
                        .iter()
                        .map(|(name, value)| format!(", {name}={value}"))
                        .collect::<String>(),
                    links.len(),
                    exe_wide,
                    image.vtables.len(),
                    match self.task_mode {
                        TaskMode::Hooks => "task hooks",
                        TaskMode::Census => "the census alone (--tasks census)",
                    }
                );
                self.attached.insert(
                    pid,
                    AttachedProcess {
                        info,
                        links,
                        registered_ns,
                    },
                );
                Ok(())
            }
            Err(err) => {
                self.ledger
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove_process(pid);
                Err(err).with_context(|| format!("attaching to pid {pid}"))
            }
        }
    }

    /// Detaches from processes that exited and drops their state.
    pub fn reap(&mut self) {
        let gone: Vec<u32> = self
            .attached
            .iter()
            .filter(|(_, p)| !p.info.is_alive())
            .map(|(&pid, _)| pid)
            .collect();
        if !gone.is_empty() {
            // Room again for those turned away by --max-processes.
            self.over_limit.clear();
        }
        for pid in gone {
            self.detach(pid);
            info!("pid {pid} exited: detached and forgot its tasks");
        }
        self.detach_unused_executables();
        // What was decided about processes that are gone is forgotten with them.
        let running =
            |&(pid, start): &(u32, u64)| procfs::start_time(pid).is_ok_and(|t| t == start);
        self.failed.retain(running);
        self.excluded.retain(running);
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expire_pending(procfs::monotonic_ns(), procfs::pid_exists);
    }

    /// Drops process `pid`'s probes and state (it exited, or exec'd another program).
    fn detach(&mut self, pid: u32) {
        if let Some(process) = self.attached.remove(&pid) {
            self.probes.detach(process.links);
        }
        if let Some(windows) = &mut self.heap_windows {
            windows.forget(&mut self.probes, pid);
        }
        if let Some(heap) = &mut self.heap {
            heap.detach(&mut self.probes, pid);
        }
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove_process(pid);
        self.workloads.forget(pid);
    }

    /// Process `pid` exec'd (reported by the kernel as it happens): if it was attached, its
    /// old program's probes and state go (its pid and start time stay the same across
    /// exec, so only this tells the new program from the old); either way it is looked at
    /// again by [`ProcessRegistry::attach_fresh`] as soon as its loader is done. Returns
    /// how long after the exec it was attached when that happened before this report.
    pub fn exec_seen(&mut self, pid: u32, ktime_ns: u64) -> Option<Duration> {
        let registered_ns = self.attached.get(&pid).map(|p| p.registered_ns);
        match registered_ns {
            // An exec reported after this program was registered is its own start: nothing
            // to undo. A periodic scan got to it before the exec's report came through;
            // exec to attach is still measured, from the kernel's clock.
            Some(registered_ns) if registered_ns > ktime_ns => {
                return Some(Duration::from_nanos(registered_ns - ktime_ns));
            }
            Some(_) => {
                self.detach(pid);
                info!(
                    "pid {pid} exec'd a new program: detached from the old one and forgot its tasks"
                );
            }
            None => {}
        }
        self.failed.retain(|&(failed_pid, _)| failed_pid != pid);
        self.excluded
            .retain(|&(excluded_pid, _)| excluded_pid != pid);
        self.fresh
            .entry(pid)
            .or_insert_with(|| (Instant::now(), ktime_ns));
        None
    }

    /// True while processes seen at exec wait for their loader.
    pub fn has_fresh(&self) -> bool {
        !self.fresh.is_empty()
    }

    /// Attaches the processes seen at exec that are `--exe` targets or, in host-wide mode,
    /// tokio services, once they have settled. One that is neither is forgotten at once;
    /// one that does not settle within [`targets::SETTLE_BEFORE_ATTACH`] is left to the
    /// periodic scans.
    pub fn attach_fresh(
        &mut self,
        exes: &ExeTargets,
        host: Option<(&HostScan, &Mutex<HostScanStats>)>,
    ) {
        self.take_judgements();
        let fresh: Vec<(u32, Instant)> = self.fresh.iter().map(|(&p, &(t, _))| (p, t)).collect();
        for (pid, seen) in fresh {
            // Done with it (attached, or not to be), or still waiting, and for what.
            let outcome = match procfs::process_info(pid) {
                Err(_) => Consideration::Skipped,
                Ok(process) if exes.contains(process.exe) => {
                    let image = self.images[&process.exe].clone();
                    if !targets::settled(&process, &image.needed_libraries) {
                        Consideration::NotSettled
                    } else if let Err(err) = self.attach_exe_process(pid) {
                        warn!("{err:#}");
                        Consideration::Skipped
                    } else {
                        Consideration::Attached
                    }
                }
                Ok(_) => {
                    match host.and_then(|(host, stats)| Some((host, stats, host.candidate(pid)?))) {
                        Some((host, stats, process)) => self.consider(host, stats, process),
                        None => Consideration::Skipped,
                    }
                }
            };
            // A loader that takes long is left to the periodic scans; a judgement is waited
            // for as long as it may take.
            let wait = match outcome {
                Consideration::NotSettled => targets::SETTLE_BEFORE_ATTACH,
                Consideration::Judging => {
                    discovery::ANALYSIS_BUDGET + targets::SETTLE_BEFORE_ATTACH
                }
                Consideration::Attached | Consideration::Skipped => std::time::Duration::ZERO,
            };
            if seen.elapsed() >= wait {
                self.fresh.remove(&pid);
            }
        }
    }

    /// Registers the settled processes of the `--exe` targets not registered yet.
    pub fn scan(&mut self, exes: &ExeTargets) {
        for process in exes.processes() {
            if self.attached.contains_key(&process.pid) {
                continue;
            }
            let image = self.images[&process.exe].clone();
            if !targets::settled(&process, &image.needed_libraries) {
                continue;
            }
            if let Err(err) = self.attach_exe_process(process.pid) {
                warn!("{err:#}");
            }
        }
    }

    /// Places `pid`'s task hooks again (the silent-probe check found them delivering
    /// nothing while tokio spawned tasks): the old links are detached first, so a hook that
    /// did work is not counted twice meanwhile. Its heap probes and its state stay. For an
    /// `--exe` target the hooks are the executable's, shared by its processes: those are
    /// placed again.
    pub fn reattach_task_hooks(&mut self, pid: u32) -> anyhow::Result<()> {
        let process = self
            .attached
            .get_mut(&pid)
            .with_context(|| format!("pid {pid} is not attached"))?;
        let exe = process.info.exe;
        let image = self.images[&exe].clone();
        if image.tasks_unreadable.is_some() || self.task_mode == TaskMode::Census {
            return Ok(());
        }
        if let Some((links, placed)) = self.exe_links.remove(&exe) {
            self.probes.detach(links);
            let path = process.info.exe_link();
            let links = self.probes.attach_tasks(&image, &path, None)?;
            self.exe_links.insert(exe, (links, placed));
            return Ok(());
        }
        let task_links = plan::task_points(&image)?.len().min(process.links.len());
        let old: Vec<AttachedLink> = process.links.drain(..task_links).collect();
        self.probes.detach(old);
        let mut links = self
            .probes
            .attach_tasks(&image, &process.info.exe_link(), Some(pid))?;
        links.append(&mut process.links);
        process.links = links;
        Ok(())
    }

    /// Detaches every probe, of every process and executable, at once (at shutdown).
    pub fn detach_all(&mut self) {
        let mut links: Vec<AttachedLink> = self
            .attached
            .drain()
            .flat_map(|(_, process)| process.links)
            .collect();
        links.extend(self.exe_links.drain().flat_map(|(_, (links, _))| links));
        if let Some(windows) = &mut self.heap_windows {
            links.extend(windows.take_all_links());
        }
        self.probes.detach(links);
    }

    /// Processes attached now.
    pub fn attached(&self) -> usize {
        self.attached.len()
    }
}

/// Says how many tasks process `pid` had spawned before this attach (tokio ids start at 1),
/// when it is not a fresh start: after leakscope itself restarted, or attached late, its
/// counts start again from zero here, and the log should say so.
fn say_tasks_before_attach(pid: u32, first_task_id_after_attach: Option<u64>) {
    if let Some(before) = first_task_id_after_attach.and_then(|next| next.checked_sub(1))
        && before > 0
    {
        info!(
            "pid {pid}: {before} tasks were spawned before this attach (leakscope restarted or \
             attached late): those still alive are counted by the task census \
             (leakscope_tasks_alive_before_attach, unless --census-seconds is 0); first polls \
             of those tasks count in leakscope_tasks_seen_before_attach_total, their \
             completions in leakscope_tasks_completed_untracked_total"
        );
    }
}

//! Host-wide mode's side of the registry: every candidate process judged (its executable
//! off the loop, by `daemon::judge`), selected by the rules, bounded by the limit, and
//! attached with task hooks shared by all processes of its executable.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::{ProcessRegistry, TaskHookScope};
use crate::daemon::judge::Judgement;
use crate::targets::procfs::{ExeIdentity, ProcessInfo};
use crate::targets::workload::{self, Workload};
use crate::targets::{self, HostScan, HostScanStats};

/// What host-wide mode made of one process.
#[derive(PartialEq)]
pub(super) enum Consideration {
    Attached,
    /// Its executable is being judged: tried again when the judgement is in.
    Judging,
    /// A tokio service whose loader is not done yet: tried again later.
    NotSettled,
    /// Attached already, not a tokio service, or failed (each said once).
    Skipped,
}

impl ProcessRegistry {
    /// Removes the task hooks host-wide mode placed on executables none of whose processes
    /// is attached any more.
    pub(super) fn detach_unused_executables(&mut self) {
        let unused: Vec<ExeIdentity> = self
            .host_executables
            .iter()
            .filter(|exe| !self.attached.values().any(|p| p.info.exe == **exe))
            .copied()
            .collect();
        for exe in unused {
            self.host_executables.remove(&exe);
            if let Some((links, _)) = self.exe_links.remove(&exe) {
                self.probes.detach(links);
            }
        }
    }

    /// Host-wide mode: attaches to the settled tokio processes of `host` not attached yet.
    /// An executable found not to be a tokio service, or a process that could not be
    /// attached, is not tried again (the latter until it restarts: pid and start time).
    pub fn scan_host(&mut self, host: &HostScan, stats: &Mutex<HostScanStats>) {
        let started = Instant::now();
        self.take_judgements();
        for process in host.candidates() {
            self.consider(host, stats, process);
        }
        let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.scans += 1;
        stats.last_scan_seconds = started.elapsed().as_secs_f64();
        stats.executables_skipped.clear();
        for reason in self.not_services.values() {
            *stats.executables_skipped.entry(reason).or_default() += 1;
        }
        stats.processes = [
            ("watched", self.attached.len()),
            ("excluded", self.excluded.len()),
            ("failed", self.failed.len()),
            ("over_limit", self.over_limit.len()),
        ]
        .into_iter()
        .map(|(state, n)| (state, n as u64))
        .collect();
    }

    /// Takes in the executables judged since the last call (see `judge`).
    pub(super) fn take_judgements(&mut self) {
        for (exe, judgement) in self.judge.judgements() {
            match judgement {
                Judgement::Service(image) => {
                    self.images.insert(exe, Arc::new(*image));
                }
                Judgement::NotTokio => {
                    self.not_services.insert(exe, "not_tokio");
                }
                Judgement::NotAnalysable(why) => {
                    // A tokio binary whose tasks cannot be found is said once, with why:
                    // the operator expects it watched.
                    warn!("{why}; its processes are not watched");
                    self.not_services.insert(exe, "not_analysable");
                }
                Judgement::Gone => {}
            }
        }
    }

    /// Host-wide mode: attaches `process` if it is a settled tokio service not attached yet.
    pub(super) fn consider(
        &mut self,
        host: &HostScan,
        stats: &Mutex<HostScanStats>,
        process: ProcessInfo,
    ) -> Consideration {
        let key = (process.pid, process.start_time);
        if self.attached.contains_key(&process.pid)
            || self.not_services.contains_key(&process.exe)
            || self.failed.contains(&key)
            || self.excluded.contains(&key)
            || self.over_limit.contains(&key)
        {
            return Consideration::Skipped;
        }
        // Learned here only when a rule needs it, and then kept for the labels.
        let workload = host
            .selection
            .needs_workload()
            .then(|| workload::of_process(process.pid, &self.node));
        if let Err(rule) = host.selection.admits(
            &process.exe_path.to_string_lossy(),
            workload.as_ref().unwrap_or(&Workload::default()),
        ) {
            match rule {
                Some(rule) => debug!("pid {}: excluded by {rule}", process.pid),
                None => debug!("pid {}: matches no --include rule", process.pid),
            }
            self.excluded.insert(key);
            return Consideration::Skipped;
        }
        // Judged off the loop (see `judge`): this process is looked at again once its
        // executable's judgement is in.
        let Some(image) = self.images.get(&process.exe).cloned() else {
            self.judge.submit(&process);
            return Consideration::Judging;
        };
        if !targets::settled(&process, &image.needed_libraries) {
            return Consideration::NotSettled;
        }
        if self.attached.len() >= self.max_processes {
            warn!(
                "pid {} ({}): not watched, {} processes are (--max-processes); it is tried \
                 again when one exits",
                process.pid,
                process.exe_path.display(),
                self.max_processes
            );
            self.over_limit.insert(key);
            return Consideration::Skipped;
        }
        // Task hooks go on the executable, once, for all its processes: the kernel
        // unregisters uprobes one at a time (~80 ms each, under a global lock), so fifty
        // replicas of a service must not mean fifty sets of hooks to remove.
        if !self.exe_links.contains_key(&process.exe)
            && self.task_mode == crate::daemon::census::TaskMode::Hooks
            && let Err(err) = self.watch_executable(&process.exe_link(), process.exe)
        {
            warn!("{err:#}");
            self.failed.insert(key);
            return Consideration::Skipped;
        }
        self.host_executables.insert(process.exe);
        match self.attach_with(process.pid, TaskHookScope::Executable, workload) {
            Ok(()) => {
                // Seen at exec: how long from the kernel's exec, whichever path (the exec's
                // report or a periodic scan) got to it first. A scan that attaches before
                // the report comes in is measured by `exec_seen` instead.
                if let Some((_, exec_ns)) = self.fresh.remove(&process.pid) {
                    let registered_ns = self.attached[&process.pid].registered_ns;
                    stats
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last_exec_to_attach_seconds =
                        Duration::from_nanos(registered_ns.saturating_sub(exec_ns)).as_secs_f64();
                }
                Consideration::Attached
            }
            Err(err) => {
                warn!("{err:#}");
                self.failed.insert((process.pid, process.start_time));
                Consideration::Skipped
            }
        }
    }

    /// Host-wide mode, after the rules changed: every process is judged again, and those
    /// attached that the rules no longer admit are detached.
    pub fn reselect(&mut self, host: &HostScan) {
        self.excluded.clear();
        let dropped: Vec<u32> = self
            .attached
            .values()
            .filter(|p| {
                let workload = self.workloads.get(p.info.pid);
                host.selection
                    .admits(&p.info.exe_path.to_string_lossy(), &workload)
                    .is_err()
            })
            .map(|p| p.info.pid)
            .collect();
        for pid in dropped {
            self.detach(pid);
            info!("pid {pid}: no longer selected by --include/--exclude: detached");
        }
        self.detach_unused_executables();
    }
}

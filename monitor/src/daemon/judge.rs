//! Host-wide mode judges each new executable off the daemon's loop: whether it is a tokio
//! service (a look for tokio's source paths in the file) and, if it is, its full analysis,
//! on a thread of its own. A large or odd binary (an analysis may take up to
//! `discovery::ANALYSIS_BUDGET`) then never delays attaching the others, following execs,
//! serving or sampling; its processes are attached when the judgement comes back.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc;

use anyhow::Context as _;

use crate::bpf::plan;
use crate::discovery::{self, TargetImage};
use crate::targets::mentions_tokio;
use crate::targets::procfs::{ExeIdentity, ProcessInfo};

/// What an executable was found to be.
pub enum Judgement {
    Service(Box<TargetImage>),
    NotTokio,
    /// A tokio binary whose tasks cannot be found, and why.
    NotAnalysable(String),
    /// The process it was reached through exited first: judged again through another.
    Gone,
}

struct Job {
    exe: ExeIdentity,
    process: ProcessInfo,
}

/// The judging thread and the executables it has been given and not answered yet.
pub struct Judge {
    jobs: mpsc::Sender<Job>,
    judgements: mpsc::Receiver<(ExeIdentity, Judgement)>,
    pending: HashSet<ExeIdentity>,
}

impl Default for Judge {
    fn default() -> Self {
        Self::new()
    }
}

impl Judge {
    pub fn new() -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (answers, judgements) = mpsc::channel();
        // One thread: judging is CPU-bound and rare (once per executable); it must not
        // compete with the drain for the daemon's cores.
        std::thread::Builder::new()
            .name("judge".into())
            .spawn(move || {
                for job in queue {
                    let judgement = judge(&job.process);
                    if answers.send((job.exe, judgement)).is_err() {
                        return;
                    }
                }
            })
            .expect("starting the judging thread");
        Self {
            jobs,
            judgements,
            pending: HashSet::new(),
        }
    }

    /// Has `process`'s executable judged, unless it already is being.
    pub fn submit(&mut self, process: &ProcessInfo) {
        if self.pending.insert(process.exe) {
            let job = Job {
                exe: process.exe,
                process: process.clone(),
            };
            if self.jobs.send(job).is_err() {
                self.pending.remove(&process.exe);
            }
        }
    }

    /// The judgements made since the last call.
    pub fn judgements(&mut self) -> Vec<(ExeIdentity, Judgement)> {
        let done: Vec<_> = self.judgements.try_iter().collect();
        for (exe, _) in &done {
            self.pending.remove(exe);
        }
        done
    }
}

fn judge(process: &ProcessInfo) -> Judgement {
    let gone = || !PathBuf::from(format!("/proc/{}", process.pid)).exists();
    if !mentions_tokio(&process.exe_link()) {
        return if gone() {
            Judgement::Gone
        } else {
            Judgement::NotTokio
        };
    }
    let analysed = analyze_process(process).and_then(|image| {
        plan::task_points(&image).with_context(|| format!("{}", process.exe_path.display()))?;
        Ok(image)
    });
    match analysed {
        Ok(image) => Judgement::Service(Box::new(image)),
        Err(_) if gone() => Judgement::Gone,
        Err(err) => Judgement::NotAnalysable(format!("{err:#}")),
    }
}

/// Analyses the executable at `path` (named `what` in errors) for attaching to it. When
/// its tokio tasks cannot be read (no task vtables, no spawn hook point) and `heap` is
/// tracked, the image for heap tracking alone ([`discovery::analyze_heap_only`]), whose
/// warning says what could not be learned; a file that is no tokio binary at all is still
/// refused.
pub fn analyze_for_attach(
    path: &std::path::Path,
    what: &str,
    heap: bool,
) -> anyhow::Result<TargetImage> {
    let refused = |err: anyhow::Error| Err(err.context(format!("analysing {what}")));
    match discovery::analyze(path) {
        Ok(image) => match plan::task_points(&image) {
            Ok(_) => Ok(image),
            Err(plan::PlanError::NoSpawnHook(..)) if heap => Ok(image.with_tasks_unreadable(
                "no hook point for spawns: no OwnedTasks::bind_inner, \
                     Spawner::spawn_task or task poll function to probe (a stripped binary \
                     without its debug file has no names to find them by)",
            )),
            Err(err) => refused(err.into()),
        },
        Err(discovery::DiscoveryError::NoTaskVtables { .. }) if heap && mentions_tokio(path) => {
            discovery::analyze_heap_only(
                path,
                "no task vtables found: a stripped binary is read by record shape, which only \
                 tokio >= 1.23 has; otherwise its task layout is one leakscope does not know",
            )
            .with_context(|| format!("analysing {what}"))
        }
        Err(err) => refused(err.into()),
    }
}

/// Analyses a process's executable, saying which process on failure.
pub fn analyze_process(process: &ProcessInfo) -> anyhow::Result<TargetImage> {
    discovery::analyze(&process.exe_link()).with_context(|| {
        format!(
            "analysing {} (pid {})",
            process.exe_path.display(),
            process.pid
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::targets::procfs;

    /// Submitting returns at once; the judgement comes later, once per executable however
    /// many of its processes ask.
    #[test]
    fn judges_off_the_caller_once_per_executable() {
        let mut children: Vec<std::process::Child> = (0..2)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut judge = Judge::new();
        let submitted = Instant::now();
        for child in &children {
            judge.submit(&procfs::process_info(child.id()).unwrap());
        }
        assert!(submitted.elapsed() < Duration::from_millis(100));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut judged = Vec::new();
        while judged.is_empty() && Instant::now() < deadline {
            judged = judge.judgements();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(judged.len(), 1, "one judgement for one executable");
        assert!(matches!(judged[0].1, Judgement::NotTokio));
        std::thread::sleep(Duration::from_millis(200));
        assert!(judge.judgements().is_empty());
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

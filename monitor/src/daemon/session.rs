//! One monitoring session: the targets analysed, the probes loaded and attached, the
//! rings drained into the ledgers, the ledgers sampled for verdicts. `leakscope daemon`
//! serves it over HTTP until stopped; `leakscope report` runs one for a fixed time and
//! prints its verdicts.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::bail;
use log::warn;
use tokio::task::JoinHandle;

use super::DaemonConfig;
use super::census::CensusRunner;
use super::drain;
use super::health;
use super::heap::{HeapMode, HeapPath, HeapTracker};
use super::heap_window::HeapWindows;
use super::judge::analyze_for_attach;
use super::registry::ProcessRegistry;
use super::silence;
use crate::analysis::Analyzer;
use crate::bpf::counters::ProbeStats;
use crate::bpf::loader::{HeapMaps, Probes};
use crate::bpf::preflight;
use crate::export::Sources;
use crate::state::heap::HeapLedger;
use crate::state::heap_windows::HeapWindowStats;
use crate::state::tasks::TaskLedger;
use crate::targets::procfs;
use crate::targets::{ExeTargets, HostScan, HostScanStats};
use crate::timing::Phases;
use monitor_common::ExecEvent;
use tokio::sync::mpsc::UnboundedReceiver;

/// How often a process seen at exec is checked for its dynamic loader being done.
const FRESH_POLL: std::time::Duration = std::time::Duration::from_millis(10);

pub struct Session {
    registry: ProcessRegistry,
    exes: ExeTargets,
    host: Option<(HostScan, Arc<Mutex<HostScanStats>>)>,
    sources: Sources,
    analysis: Arc<Mutex<Analyzer>>,
    drain: JoinHandle<std::io::Result<()>>,
    /// Every exec on the host, as the kernel reports it, passed on by the drain (which
    /// reads them in order with the task events).
    execs: UnboundedReceiver<ExecEvent>,
    /// `--heap adaptive`: what its windows found, and how many windows make a suspect.
    heap_windows: Option<(Arc<Mutex<HeapWindowStats>>, usize)>,
    started: Instant,
    silence: silence::SilenceWatch,
    /// Reads the tasks spawned before attach (`None` with the census off).
    census: Option<CensusRunner>,
}

impl Session {
    /// Analyses every target, loads the probes and attaches them. Bad targets (no such
    /// pid, not a tokio binary, ...) are reported before anything is loaded into the
    /// kernel: those errors need no privileges to explain.
    pub async fn start(config: &DaemonConfig) -> anyhow::Result<Self> {
        if config.pids.is_empty() && config.exes.is_empty() && config.host.is_none() {
            bail!(
                "nothing to watch: give --pid PID or --exe PATH (both may repeat), or --all \
                 for every tokio service on the host"
            );
        }
        let exes = ExeTargets::resolve(&config.exes)?;
        let mut phases = Phases::start("daemon start");

        // Bad targets (no such pid, not a tokio binary, ...) are reported before anything is
        // loaded into the kernel: those errors need no privileges to explain.
        let heap = config.heap != HeapMode::Off;
        let mut images = HashMap::new();
        for &pid in &config.pids {
            let info = procfs::process_info(pid)?;
            if let Entry::Vacant(entry) = images.entry(info.exe) {
                let image = analyze_for_attach(
                    &info.exe_link(),
                    &format!("{} (pid {pid})", info.exe_path.display()),
                    heap,
                )?;
                // Once per executable, however many of its processes are watched.
                for warning in &image.warnings {
                    warn!("{}: {warning}", info.exe_path.display());
                }
                entry.insert(Arc::new(image));
            }
        }

        for (path, exe) in exes.iter() {
            if let Entry::Vacant(entry) = images.entry(exe) {
                let image = analyze_for_attach(path, &format!("--exe {}", path.display()), heap)?;
                for warning in &image.warnings {
                    warn!("{}: {warning}", path.display());
                }
                entry.insert(Arc::new(image));
            }
        }

        phases.lap("analysis");
        if let Some(refusal) = preflight::refusal(&preflight::static_checks()) {
            bail!(refusal);
        }
        let mut probes = Probes::load(match config.heap {
            HeapMode::Off => HeapMaps::Off,
            HeapMode::Exact | HeapMode::Sampled | HeapMode::Adaptive => HeapMaps::Tracking {
                max_blocks: config.heap_max_blocks,
                ring_bytes: match config.heap_path {
                    HeapPath::Events => monitor_common::HEAP_RINGBUF_BYTES,
                    HeapPath::Aggregate => monitor_common::HEAP_GROUP_RINGBUF_BYTES,
                },
            },
        })?;
        phases.lap("load_probes");
        let ring = probes.take_events()?;
        probes.watch_execs()?;
        let (exec_notify, execs) = tokio::sync::mpsc::unbounded_channel();
        let exec_stream = drain::ExecStream {
            ring: probes.take_exec_events()?,
            notify: exec_notify,
        };
        let kernel = Arc::new(probes.take_counters()?);
        let ledger = Arc::new(Mutex::new(TaskLedger::new()));
        let heap = match config.heap {
            HeapMode::Off => None,
            HeapMode::Exact | HeapMode::Sampled | HeapMode::Adaptive => {
                probes.enable_heap()?;
                Some(drain::HeapStream {
                    ring: probes.take_heap_events()?,
                    ledger: Arc::new(Mutex::new(HeapLedger::default())),
                    aggregates: probes.heap_aggregates()?,
                })
            }
        };
        let heap_tracker = heap
            .as_ref()
            .map(|h| HeapTracker::new(h.ledger.clone(), config.heap).with_path(config.heap_path));
        let drain = tokio::spawn(drain::drain(ring, ledger.clone(), heap, exec_stream));
        let heap_ledger = heap_tracker.as_ref().map(|h| h.ledger.clone());
        let probe_stats = if config.probe_stats {
            Some(Arc::new(ProbeStats::enable(&probes)?))
        } else {
            None
        };
        let mut registry = ProcessRegistry::new(
            probes,
            images,
            ledger.clone(),
            heap_tracker,
            config.node.clone(),
            config.max_processes,
        );
        registry.set_task_mode(config.tasks);
        // Before any process is attached: with it, none gets heap probes at attach.
        let heap_windows = (config.heap == HeapMode::Adaptive).then(|| {
            let windows = HeapWindows::new(
                config.heap_windows,
                config.analysis.thresholds.min_heap_growth_per_second,
            );
            let stats = windows.stats.clone();
            let min_windows = windows.config().min_windows;
            registry.set_heap_windows(windows);
            (stats, min_windows)
        });
        phases.lap("setup");
        for (path, exe) in exes.iter() {
            registry.watch_executable(path, exe)?;
        }
        for &pid in &config.pids {
            registry.attach(pid)?;
        }
        phases.lap("attach");
        registry.scan(&exes);
        let host = config
            .host
            .clone()
            .map(|under| (HostScan::new(under, config.select.clone()), Arc::default()));
        if let Some((host, stats)) = &host {
            registry.scan_host(host, stats);
        }

        phases.lap("host_scan");
        phases.finish();
        let census = CensusRunner::start(ledger.clone(), config.census);
        let analysis = Arc::new(Mutex::new(Analyzer::new(config.analysis)));
        let sources = Sources {
            ledger,
            kernel: Some(kernel),
            heap: heap_ledger,
            probe_stats,
            analysis: Some(analysis.clone()),
            host: host.as_ref().map(|(_, stats)| stats.clone()),
            workloads: registry.workloads(),
            health: Arc::default(),
            heap_windows: heap_windows.as_ref().map(|(stats, _)| stats.clone()),
        };
        Ok(Self {
            registry,
            exes,
            host,
            sources,
            analysis,
            drain,
            execs,
            heap_windows,
            started: Instant::now(),
            silence: silence::SilenceWatch::default(),
            census,
        })
    }

    /// What the exports read.
    pub fn sources(&self) -> Sources {
        self.sources.clone()
    }

    /// Detaches from processes that exited; attaches to new processes of `--exe` targets;
    /// ends the `--heap adaptive` window phases that are over.
    pub fn rescan(&mut self) {
        self.registry.advance_heap_windows();
        self.registry.reap();
        self.registry.scan(&self.exes);
        if let Some((host, stats)) = &self.host {
            self.registry.scan_host(host, stats);
        }
    }

    /// Follows processes as they start, exec and exit: whichever comes first of the next
    /// periodic scan (`rescan`), an exec reported by the kernel, or a process seen at exec
    /// becoming ready. Cancel-safe, for use in a `select!`.
    ///
    /// Fails, with the reason, when the drain stops (a ring's fd failed): the session is
    /// blind then.
    pub async fn follow_processes(
        &mut self,
        rescan: &mut tokio::time::Interval,
    ) -> Result<(), String> {
        let fresh = self.has_fresh();

        tokio::select! {
            _ = rescan.tick() => self.rescan(),
            Some(exec) = self.execs.recv() => self.take_execs(exec),
            () = tokio::time::sleep(FRESH_POLL), if fresh => self.attach_fresh(),
            result = &mut self.drain => {
                return Err(match result {
                    Ok(Ok(())) => "the drain ended".to_string(),
                    Ok(Err(err)) => err.to_string(),
                    Err(err) => err.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Takes in `exec` and every other one waiting.
    fn take_execs(&mut self, exec: ExecEvent) {
        let mut exec = Some(exec);
        while let Some(ExecEvent { pid, ktime_ns, .. }) =
            exec.take().or_else(|| self.execs.try_recv().ok())
        {
            // Attached by a periodic scan before the exec's report came in.
            if let (Some(attached_after), Some((_, stats))) =
                (self.registry.exec_seen(pid, ktime_ns), &self.host)
            {
                stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .last_exec_to_attach_seconds = attached_after.as_secs_f64();
            }
        }
        self.attach_fresh();
    }

    /// True while processes seen at exec wait for their dynamic loader.
    pub fn has_fresh(&self) -> bool {
        self.registry.has_fresh()
    }

    /// Attaches the processes seen at exec that are ready.
    pub fn attach_fresh(&mut self) {
        let host = self.host.as_ref().map(|(scan, stats)| (scan, &**stats));
        self.registry.attach_fresh(&self.exes, host);
    }

    /// Applies what changed from `running` to `new` that can change while running: the
    /// `--include`/`--exclude` rules (processes no longer admitted are detached, excluded
    /// ones judged again) and the verdict thresholds. Returns the settings that changed but
    /// need a restart.
    pub fn reconfigure(&mut self, running: &DaemonConfig, new: &DaemonConfig) -> Vec<&'static str> {
        if let Some((host, _)) = &mut self.host {
            host.selection = new.select.clone();
            self.registry.reselect(host);
        }
        {
            let mut analysis = self.analysis.lock().unwrap_or_else(|e| e.into_inner());
            let mut thresholds = new.analysis.thresholds;
            // The window sizes the history kept: it stays.
            thresholds.window = running.analysis.thresholds.window;
            thresholds.min_samples = running.analysis.thresholds.min_samples;
            analysis.set_thresholds(thresholds);
        }
        let mut restart = Vec::new();
        let mut changed = |name, differs: bool| {
            if differs {
                restart.push(name);
            }
        };
        changed("pids", running.pids != new.pids);
        changed("exes", running.exes != new.exes);
        changed("all/all_under", running.host != new.host);
        changed("listen", running.listen != new.listen);
        changed("web_config", running.web_config != new.web_config);
        changed("rescan_seconds", running.rescan != new.rescan);
        changed("heap", running.heap != new.heap);
        changed("heap_path", running.heap_path != new.heap_path);
        changed(
            "heap_max_blocks",
            running.heap_max_blocks != new.heap_max_blocks,
        );
        changed("probe_stats", running.probe_stats != new.probe_stats);
        changed("heap_windows", running.heap_windows != new.heap_windows);
        changed("node_log_dir", running.node != new.node);
        changed("max_processes", running.max_processes != new.max_processes);
        changed("census_seconds", running.census != new.census);
        changed("tasks", running.tasks != new.tasks);
        changed(
            "verdict window/sample",
            running.analysis.period != new.analysis.period
                || running.analysis.thresholds.window != new.analysis.thresholds.window,
        );
        restart
    }

    /// Samples the ledgers and judges every site again, leaving out of judgement the
    /// sites of processes whose figures are incomplete (see `state::health`).
    pub fn sample(&mut self) {
        let t = self.started.elapsed().as_secs_f64();
        self.check_health(t);
        let degraded = self
            .sources
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .all();
        self.analysis
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_degraded(degraded);
        let tasks = self
            .sources
            .ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot(procfs::monotonic_ns());
        let heap = match &self.heap_windows {
            // The ledger holds a window's blocks only while it runs: judged by the windows.
            Some(windows) => {
                self.sample_heap_windows(t, &tasks, windows.clone());
                Vec::new()
            }
            None => self
                .sources
                .heap
                .as_ref()
                .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).snapshot())
                .unwrap_or_default(),
        };
        self.analysis
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(t, &tasks, &heap);
    }

    /// `--heap adaptive`: moves the windows on (given each process's live tasks) and hands
    /// the analysis their verdicts.
    fn sample_heap_windows(
        &mut self,
        t: f64,
        tasks: &[leakscope_api::types::SiteSnapshot],
        (stats, min_windows): (Arc<Mutex<HeapWindowStats>>, usize),
    ) {
        let mut alive: HashMap<u32, u64> = HashMap::new();
        for site in tasks {
            *alive.entry(site.pid).or_default() += site.alive;
        }
        self.registry.tick_heap_windows(t, &alive);
        let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        {
            let health = self
                .sources
                .health
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (&pid, process) in &mut stats.processes {
                process.mark_losses(&health.degraded(pid));
            }
        }
        let mut analysis = self.analysis.lock().unwrap_or_else(|e| e.into_inner());
        let limits = analysis.config().thresholds;
        let verdicts = stats
            .processes
            .iter()
            .flat_map(|(&pid, process)| {
                crate::analysis::windows::judge(pid, process, &limits, min_windows)
            })
            .collect();
        analysis.set_window_verdicts(verdicts);
    }

    /// Takes in what was lost since the last sample (see `daemon::health`), and checks for
    /// silent probes (`daemon::silence`).
    fn check_health(&mut self, t: f64) {
        let window = self
            .analysis
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config()
            .thresholds
            .window;
        health::observe_losses(&self.sources, t, window);
        silence::check_all(&mut self.silence, &mut self.registry, &self.sources, t);
    }

    /// Detaches everything; the session is over.
    pub fn shutdown(mut self) {
        self.drain.abort();
        drop(self.census.take());
        self.registry.detach_all();
    }

    /// Processes attached now.
    pub fn attached(&self) -> usize {
        self.registry.attached()
    }

    pub fn analysis(&self) -> &Arc<Mutex<Analyzer>> {
        &self.analysis
    }
}

//! The long-running job: attach to target processes, keep their task ledger current, serve
//! `/metrics`, `/healthz` and the JSON API, follow processes as they start and exit.

pub mod drain;
pub mod heap;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use log::{info, warn};
use serde::Serialize;

use crate::bpf::attach::AttachedLink;
use crate::bpf::counters::ProbeStats;
use crate::bpf::loader::{HeapMaps, Probes};
use crate::daemon::heap::{HeapMode, HeapTracker};
use crate::discovery::{self, TargetImage};
use crate::export::prometheus::{self, Sources};
use crate::state::heap::HeapLedger;
use crate::state::stream::StreamStats;
use crate::state::tasks::{ProcessSummary, ProcessTasks, SiteSnapshot, TaskLedger};
use crate::targets::procfs::{self, ExeIdentity, ProcessInfo};

/// What the user asked the daemon to watch.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub pids: Vec<u32>,
    pub exes: Vec<PathBuf>,
    pub listen: SocketAddr,
    /// How often exited processes are reaped and `--exe` targets rescanned.
    pub rescan: Duration,
    pub heap: HeapMode,
    /// Outstanding blocks the kernel tracks at once, across processes (heap mode only).
    pub heap_max_blocks: u32,
    /// Export the kernel's run statistics of leakscope's own programs.
    pub probe_stats: bool,
}

struct AttachedProcess {
    info: ProcessInfo,
    links: Vec<AttachedLink>,
}

/// Processes the daemon is attached to, keyed by pid, with their analysed executables
/// cached by executable identity.
struct ProcessRegistry {
    probes: Probes,
    images: HashMap<ExeIdentity, Arc<TargetImage>>,
    attached: HashMap<u32, AttachedProcess>,
    ledger: Arc<Mutex<TaskLedger>>,
    heap: Option<HeapTracker>,
    /// Task hooks placed on `--exe` executables, covering all their processes.
    exe_links: HashMap<ExeIdentity, Vec<AttachedLink>>,
}

/// How long a process runs before it is registered: its heap probes go into the libraries
/// it maps, which the dynamic loader may still be mapping in its first moments. (Its task
/// events are not lost meanwhile: `--exe` hooks are on the file and their events are held.)
const SETTLE_BEFORE_ATTACH: Duration = Duration::from_secs(1);

/// Where task hooks are placed for a process.
#[derive(Debug, Clone, Copy)]
enum TaskHookScope {
    /// In this process only (`--pid`).
    Process,
    /// On the executable, for all processes running it (`--exe`).
    Executable,
}

impl ProcessRegistry {
    fn image_for(&mut self, process: &ProcessInfo) -> anyhow::Result<Arc<TargetImage>> {
        if let Some(image) = self.images.get(&process.exe) {
            return Ok(image.clone());
        }
        let image = Arc::new(analyze_process(process)?);
        for warning in &image.warnings {
            warn!("{}: {warning}", process.exe_path.display());
        }
        self.images.insert(process.exe, image.clone());
        Ok(image)
    }

    /// Attaches to `pid` with per-process task hooks (`--pid`), once it has run for
    /// [`SETTLE_BEFORE_ATTACH`] (see `scan`).
    fn attach(&mut self, pid: u32) -> anyhow::Result<()> {
        if let Some(age) = procfs::process_info(pid)
            .ok()
            .as_ref()
            .and_then(procfs::age)
            && age < SETTLE_BEFORE_ATTACH
        {
            std::thread::sleep(SETTLE_BEFORE_ATTACH - age);
        }
        self.attach_with(pid, TaskHookScope::Process)
    }

    /// Places the task hooks of an `--exe` target on its file: a uprobe lives on the file's
    /// inode, so once placed it reports every process that runs the file, from its exec on.
    /// Events of processes not registered yet are held and replayed (see
    /// `tasks::PendingEvents`), so the tasks a service spawns as it starts are counted.
    fn watch_executable(&mut self, path: &std::path::Path, exe: ExeIdentity) -> anyhow::Result<()> {
        let image = self.images[&exe].clone();
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
        self.exe_links.insert(exe, links);
        Ok(())
    }

    /// Registers `pid`, a process of an `--exe` target (its task hooks are on the
    /// executable already), and places its heap probes.
    fn attach_exe_process(&mut self, pid: u32) -> anyhow::Result<()> {
        self.attach_with(pid, TaskHookScope::Executable)
    }

    fn attach_with(&mut self, pid: u32, scope: TaskHookScope) -> anyhow::Result<()> {
        if self.attached.contains_key(&pid) {
            return Ok(());
        }
        let info = procfs::process_info(pid)?;
        let image = self.image_for(&info)?;
        let mapping_start = procfs::exe_mapping_start(&info)?;
        let load_bias = mapping_start.wrapping_sub(image.link_base());
        // Registered before the probes go in, so the first events already find their process.
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_process(ProcessTasks::new(
                pid,
                info.exe_name(),
                image.clone(),
                load_bias,
            ));
        let task_links = match scope {
            TaskHookScope::Process => self
                .probes
                .attach_tasks(&image, &info.exe_link(), Some(pid)),
            // Placed on the executable when the daemon started (`watch_executable`).
            TaskHookScope::Executable => Ok(Vec::new()),
        };
        let attached = task_links
            .map_err(anyhow::Error::from)
            .and_then(|mut links| {
                if let Some(heap) = &mut self.heap {
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
                self.ledger
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .mark_probes_ready(pid);
                let exe_wide = self.exe_links.get(&info.exe).map_or(0, Vec::len);
                info!(
                    "attached to pid {pid} ({}): {} hook points in the process, {} on its \
                     executable, {} spawn sites known",
                    info.exe_path.display(),
                    links.len(),
                    exe_wide,
                    image.vtables.len()
                );
                self.attached.insert(pid, AttachedProcess { info, links });
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
    fn reap(&mut self) {
        let gone: Vec<u32> = self
            .attached
            .iter()
            .filter(|(_, p)| !p.info.is_alive())
            .map(|(&pid, _)| pid)
            .collect();
        for pid in gone {
            if let Some(process) = self.attached.remove(&pid) {
                self.probes.detach(process.links);
            }
            if let Some(heap) = &mut self.heap {
                heap.detach(&mut self.probes, pid);
            }
            self.ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove_process(pid);
            info!("pid {pid} exited: detached and forgot its tasks");
        }
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expire_pending(procfs::monotonic_ns(), procfs::pid_exists);
    }

    /// Registers processes running one of `exes` once they have run for
    /// [`SETTLE_BEFORE_ATTACH`].
    fn scan(&mut self, exes: &[ExeIdentity]) {
        for &exe in exes {
            for process in procfs::processes_running(exe) {
                let pid = process.pid;
                if self.attached.contains_key(&pid)
                    || procfs::age(&process).is_some_and(|age| age < SETTLE_BEFORE_ATTACH)
                {
                    continue;
                }
                if let Err(err) = self.attach_exe_process(pid) {
                    warn!("{err:#}");
                }
            }
        }
    }
}

fn analyze_process(process: &ProcessInfo) -> anyhow::Result<TargetImage> {
    discovery::analyze(&process.exe_link()).with_context(|| {
        format!(
            "analysing {} (pid {})",
            process.exe_path.display(),
            process.pid
        )
    })
}

/// The JSON view of the task table (`GET /api/v1/tasks`).
#[derive(Debug, Serialize)]
pub struct TasksResponse {
    pub sites: Vec<SiteSnapshot>,
    pub stream: StreamStats,
    pub attached_processes: usize,
    pub processes: Vec<ProcessSummary>,
}

async fn metrics_handler(State(sources): State<Sources>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        prometheus::render(&sources),
    )
}

async fn heap_handler(State(sources): State<Sources>) -> axum::Json<serde_json::Value> {
    let Some(heap) = &sources.heap else {
        return axum::Json(serde_json::json!({"enabled": false, "groups": []}));
    };
    let heap = heap.lock().unwrap_or_else(|e| e.into_inner());
    axum::Json(serde_json::json!({
        "enabled": true,
        "groups": heap.snapshot(),
        "stream": heap.stream.stats,
    }))
}

async fn tasks_handler(State(sources): State<Sources>) -> axum::Json<TasksResponse> {
    let ledger = sources.ledger.lock().unwrap_or_else(|e| e.into_inner());
    axum::Json(TasksResponse {
        sites: ledger.snapshot(procfs::monotonic_ns()),
        stream: ledger.stream.stats,
        attached_processes: ledger.attached_processes(),
        processes: ledger.process_summaries(),
    })
}

pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    if config.pids.is_empty() && config.exes.is_empty() {
        bail!("nothing to watch: give --pid PID or --exe PATH (both may repeat)");
    }
    let exes: Vec<ExeIdentity> = config
        .exes
        .iter()
        .map(|path| procfs::exe_identity(path).with_context(|| format!("--exe {}", path.display())))
        .collect::<anyhow::Result<_>>()?;

    // Bad targets (no such pid, not a tokio binary, ...) are reported before anything is
    // loaded into the kernel: those errors need no privileges to explain.
    let mut images = HashMap::new();
    for &pid in &config.pids {
        let info = procfs::process_info(pid)?;
        if let std::collections::hash_map::Entry::Vacant(entry) = images.entry(info.exe) {
            entry.insert(Arc::new(analyze_process(&info)?));
        }
    }

    for (path, &exe) in config.exes.iter().zip(&exes) {
        if let std::collections::hash_map::Entry::Vacant(entry) = images.entry(exe) {
            let image = discovery::analyze(path)
                .with_context(|| format!("analysing --exe {}", path.display()))?;
            for warning in &image.warnings {
                warn!("{}: {warning}", path.display());
            }
            entry.insert(Arc::new(image));
        }
    }

    let mut probes = Probes::load(match config.heap {
        HeapMode::Off => HeapMaps::Off,
        HeapMode::Exact | HeapMode::Sampled => HeapMaps::Tracking {
            max_blocks: config.heap_max_blocks,
        },
    })?;
    let ring = probes.take_events()?;
    let kernel = Arc::new(probes.take_counters()?);
    let ledger = Arc::new(Mutex::new(TaskLedger::new()));
    let heap = match config.heap {
        HeapMode::Off => None,
        HeapMode::Exact | HeapMode::Sampled => {
            probes.enable_heap()?;
            Some(drain::HeapStream {
                ring: probes.take_heap_events()?,
                ledger: Arc::new(Mutex::new(HeapLedger::default())),
            })
        }
    };
    let heap_tracker = heap
        .as_ref()
        .map(|h| HeapTracker::new(h.ledger.clone(), config.heap));
    let mut drain = tokio::spawn(drain::drain(ring, ledger.clone(), heap));
    let heap_ledger = heap_tracker.as_ref().map(|h| h.ledger.clone());
    let probe_stats = if config.probe_stats {
        Some(Arc::new(ProbeStats::enable(&probes)?))
    } else {
        None
    };
    let mut registry = ProcessRegistry {
        probes,
        images,
        attached: HashMap::new(),
        ledger: ledger.clone(),
        heap: heap_tracker,
        exe_links: HashMap::new(),
    };
    for (path, &exe) in config.exes.iter().zip(&exes) {
        registry.watch_executable(path, exe)?;
    }
    for &pid in &config.pids {
        registry.attach(pid)?;
    }
    registry.scan(&exes);

    let sources = Sources {
        ledger,
        kernel: Some(kernel),
        heap: heap_ledger,
        probe_stats,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/v1/tasks", get(tasks_handler))
        .route("/api/v1/heap", get(heap_handler))
        .with_state(sources);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    info!("serving /metrics on http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(config.rescan);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                registry.reap();
                registry.scan(&exes);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            result = &mut drain => {
                bail!("the event stream stopped: {:?}", result);
            }
        }
    }
    server.abort();
    info!(
        "shutting down: detaching from {} process(es)",
        registry.attached.len()
    );
    Ok(())
}

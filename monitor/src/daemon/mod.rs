//! The long-running job, wiring the stages together: analyse every target before loading
//! anything (bad input is explained without privileges), load the probes, attach the
//! targets (`registry`), drain the rings into the ledgers (`drain`), serve the exports
//! (`http`), and follow processes as they start and exit.

pub mod drain;
pub mod heap;
pub mod http;
pub mod registry;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use log::{info, warn};

use crate::bpf::counters::ProbeStats;
use crate::bpf::loader::{HeapMaps, Probes};
use crate::daemon::heap::{HeapMode, HeapTracker};
use crate::daemon::registry::{ProcessRegistry, analyze_process};
use crate::discovery;
use crate::export::Sources;
use crate::state::heap::HeapLedger;
use crate::state::tasks::TaskLedger;
use crate::targets::ExeTargets;
use crate::targets::procfs;

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

pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    if config.pids.is_empty() && config.exes.is_empty() {
        bail!("nothing to watch: give --pid PID or --exe PATH (both may repeat)");
    }
    let exes = ExeTargets::resolve(&config.exes)?;

    // Bad targets (no such pid, not a tokio binary, ...) are reported before anything is
    // loaded into the kernel: those errors need no privileges to explain.
    let mut images = HashMap::new();
    for &pid in &config.pids {
        let info = procfs::process_info(pid)?;
        if let Entry::Vacant(entry) = images.entry(info.exe) {
            entry.insert(Arc::new(analyze_process(&info)?));
        }
    }

    for (path, exe) in exes.iter() {
        if let Entry::Vacant(entry) = images.entry(exe) {
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
    let mut registry = ProcessRegistry::new(probes, images, ledger.clone(), heap_tracker);
    for (path, exe) in exes.iter() {
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
    let server = http::serve(config.listen, sources).await?;

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
        registry.attached()
    );
    Ok(())
}

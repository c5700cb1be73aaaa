//! The long-running job, wiring the stages together: analyse every target before loading
//! anything (bad input is explained without privileges), load the probes, attach the
//! targets (`registry`), drain the rings into the ledgers (`drain`), serve the exports
//! (`http`), and follow processes as they start and exit.

pub mod basic_auth;
pub mod census;
pub mod cert_reload;
pub mod config_file;
pub mod drain;
pub mod health;
pub mod heap;
pub mod heap_window;
pub mod http;
pub mod judge;
pub mod listener;
pub mod registry;
pub mod report;
pub mod session;
pub mod silence;
pub mod tls;
pub mod web_config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use log::{error, info, warn};

use crate::analysis::AnalysisConfig;
use crate::daemon::heap::{HeapMode, HeapPath};
use crate::targets::select::Selection;
use crate::targets::workload::NodeFiles;
use session::Session;

/// What the user asked the daemon to watch.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub pids: Vec<u32>,
    pub exes: Vec<PathBuf>,
    /// Host-wide mode: every tokio service whose executable path starts with this.
    pub host: Option<PathBuf>,
    pub listen: SocketAddr,
    /// The listener's TLS and basic auth settings (exporter-toolkit's YAML format).
    pub web_config: Option<PathBuf>,
    /// How often exited processes are reaped and `--exe` targets rescanned.
    pub rescan: Duration,
    pub heap: HeapMode,
    /// How the heap probes report (aggregated in the kernel, or an event per block).
    pub heap_path: HeapPath,
    /// Outstanding blocks the kernel tracks at once, across processes (heap mode only).
    pub heap_max_blocks: u32,
    /// `--heap adaptive`'s windows.
    pub heap_windows: heap_window::HeapWindowConfig,
    /// Export the kernel's run statistics of leakscope's own programs.
    pub probe_stats: bool,
    /// How the leak verdicts sample and judge.
    pub analysis: AnalysisConfig,
    /// Where the node's files name containers and pods.
    pub node: NodeFiles,
    /// Host-wide mode's `--include`/`--exclude` rules.
    pub select: Selection,
    /// Host-wide mode: processes attached at most at once.
    pub max_processes: usize,
    /// How often the task census reads each process's runtime lists (zero: never; see
    /// `targets::census`).
    pub census: Duration,
    /// Who counts tasks: hooks (with the census for those from before attach) or the
    /// census alone.
    pub tasks: census::TaskMode,
}

/// Runs until SIGINT or SIGTERM: attaches, serves the exports, follows processes as they
/// start and exit, and samples the ledgers for the verdicts. SIGHUP calls `reload` for the
/// settings as they are now and applies what can change while running (see
/// [`Session::reconfigure`]); a bad config is logged and the running settings are kept.
pub async fn run(
    config: DaemonConfig,
    reload: impl Fn() -> anyhow::Result<DaemonConfig>,
) -> anyhow::Result<()> {
    // Before anything is attached: a mistake in it is explained without side effects.
    let web = config
        .web_config
        .as_deref()
        .map(web_config::load)
        .transpose()?;
    let listener = http::bind(config.listen).await?;
    let mut session = Session::start(&config).await?;
    let server = http::serve(listener, web.as_ref(), session.sources());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut rescan = tokio::time::interval(config.rescan);
    let mut sample = tokio::time::interval(Duration::from_secs_f64(config.analysis.period));
    let mut running = config;
    loop {
        tokio::select! {
            followed = session.follow_processes(&mut rescan) => {
                if let Err(reason) = followed {
                    bail!("the event stream stopped: {reason}");
                }
            }
            _ = sample.tick() => session.sample(),
            _ = hangup.recv() => match reload() {
                Ok(new) => {
                    for setting in session.reconfigure(&running, &new) {
                        warn!("reload: {setting} changed in the config; restart leakscope to apply it");
                    }
                    info!("reload: config read again and applied");
                    running = new;
                }
                Err(err) => error!("reload: {err:#}; keeping the running settings"),
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    server.abort();
    info!(
        "shutting down: detaching from {} process(es)",
        session.attached()
    );
    session.shutdown();
    Ok(())
}

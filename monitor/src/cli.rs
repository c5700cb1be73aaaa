//! The command line's shape: subcommands, flags and their help (clap). `main.rs` turns
//! them into the library's configuration and runs them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use leakscope::analysis::AnalysisConfig;
use leakscope::daemon::census::TaskMode;
use leakscope::daemon::heap::{HeapMode, HeapPath};
use leakscope::daemon::heap_window::HeapWindowConfig;

#[derive(Debug, Parser)]
#[command(
    name = "leakscope",
    version,
    about = "Find task and heap leaks in running tokio services"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Attach to running processes and export per-spawn-site task counts (and, with --heap,
    /// live heap per allocation callsite), and leak verdicts.
    Daemon(DaemonArgs),
    /// Attach for a while, then print the leak suspects with their evidence and remedy.
    /// Exits 0 when there is none, 1 when there are suspects, 2 on error: usable as a CI or
    /// canary gate.
    Report {
        #[command(flatten)]
        targets: Targets,
        /// How long to watch, in seconds (the verdict window).
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// Heap tracking; `exact` by default here, since a report's cost is bounded by its
        /// duration.
        #[arg(long, value_enum, default_value = "exact")]
        heap: HeapMode,
        /// Print JSON (the /api/v1/sites body: every site with its verdict) instead of a
        /// table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        thresholds: VerdictThresholds,
    },
    /// Check what this kernel and these privileges allow (capabilities, BTF, uprobes, the
    /// exec tracepoint, a real uprobe placed and removed) and say how to fix what is
    /// missing. Exits 1 when leakscope cannot run here.
    Doctor,
    /// Check a config file, and the web config it names, without starting: prints the
    /// settings they make, or the one line that says what is wrong (exit 1).
    CheckConfig {
        /// The TOML file.
        #[arg(required_unless_present = "web_config")]
        file: Option<PathBuf>,
        /// A web config to check, alone or instead of the one the TOML file names (as
        /// `daemon --web-config` would be used).
        #[arg(long)]
        web_config: Option<PathBuf>,
    },
    /// Show the spawn sites, hook points and heap probes leakscope finds in a binary (no root
    /// needed).
    Inspect {
        /// Executable to analyse.
        #[arg(required_unless_present = "pid", conflicts_with = "pid")]
        binary: Option<PathBuf>,
        /// Analyse the executable of this running process instead.
        #[arg(long)]
        pid: Option<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A live view of every site's verdict, refreshed every second: from a running daemon
    /// (--api, the default) or from a session of its own (--pid/--exe, as root).
    Top {
        /// The API of a running `leakscope daemon` (its --listen address); used when no
        /// --pid or --exe is given.
        #[arg(long, conflicts_with_all = ["pids", "exes"])]
        api: Option<SocketAddr>,
        #[command(flatten)]
        targets: Targets,
        /// Heap tracking of its own session (see `daemon --heap`).
        #[arg(long, value_enum, default_value = "off")]
        heap: HeapMode,
        /// Seconds of history a verdict of its own session looks at (sampled every second).
        #[arg(long, default_value_t = 60.0)]
        verdict_window_seconds: f64,
    },
}

/// `leakscope daemon`'s flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct DaemonArgs {
    /// Read settings from this TOML file (see README, "Config file"); flags given on
    /// the command line win over it. Default: /etc/leakscope/config.toml when it exists.
    /// SIGHUP reads it again.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) targets: Targets,
    /// Address for /metrics, /healthz and the JSON API (/api/v1/tasks, /api/v1/heap,
    /// /api/v1/suspects, /api/v1/sites).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub(crate) listen: SocketAddr,
    /// TLS, client certificates and basic auth for --listen, from a YAML file in the
    /// format of Prometheus' exporter-toolkit (README, "The listener"). Without it the
    /// API is plain HTTP, open to whoever reaches the address.
    #[arg(long)]
    pub(crate) web_config: Option<PathBuf>,
    /// Seconds between checks for exited and newly started targets.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) rescan_seconds: f64,
    /// Heap tracking: `off` (task tracking only), `exact` (every allocation of the
    /// watched processes, ~2.6 µs per allocate+free), `sampled` (1 in 16 blocks,
    /// figures scaled; ~1.8 µs) or `adaptive` (probes only in bounded windows, when a
    /// process's memory grows beyond what its tasks hold: --heap-window-*). See README for
    /// why the default is off.
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) heap: HeapMode,
    /// Export leakscope_probe_runs_total and leakscope_probe_run_seconds_total: how often
    /// each of leakscope's BPF programs ran in the watched processes and for how long.
    /// Turns on the kernel's BPF statistics while the daemon runs, which adds two clock
    /// reads to every BPF program run on the host.
    #[arg(long)]
    pub(crate) probe_stats: bool,
    /// Seconds of history a leak verdict looks at; a site is judged once half of it is
    /// sampled.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) verdict_window_seconds: f64,
    /// Seconds between the samples verdicts are made from.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) verdict_sample_seconds: f64,
    #[command(flatten)]
    pub(crate) thresholds: VerdictThresholds,
    /// Log lines as text (journald's priority prefixes when run under systemd) or as one
    /// JSON object per line.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// The config file read when `--config` is not given, if it exists.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/leakscope/config.toml";

/// Which processes to watch.
#[derive(Debug, Clone, Args)]
pub(crate) struct Targets {
    /// Process to watch (repeatable).
    #[arg(long = "pid")]
    pub(crate) pids: Vec<u32>,
    /// Watch every process running this executable, now and as they start (repeatable).
    #[arg(long = "exe")]
    pub(crate) exes: Vec<PathBuf>,
    /// Watch every tokio service on the host, now and as they start (executables are
    /// recognised by their code; the host's init and leakscope itself never are). What
    /// `leakscope daemon` does when given no --pid and no --exe.
    #[arg(long)]
    pub(crate) all: bool,
    /// Host-wide mode: only executables whose path starts with this.
    #[arg(long, default_value = "/")]
    pub(crate) all_under: PathBuf,
    /// Host-wide mode: watch only processes matching one of these KEY=GLOB rules (repeatable;
    /// KEY: exe, unit, namespace, pod, container; e.g. --include unit='payments*.service').
    #[arg(long)]
    pub(crate) include: Vec<String>,
    /// Host-wide mode: never watch processes matching one of these rules (repeatable; wins over
    /// --include; e.g. --exclude namespace=kube-system).
    #[arg(long)]
    pub(crate) exclude: Vec<String>,
    /// Host-wide mode: processes watched at most at once; more are counted
    /// (leakscope_host_processes{state="over_limit"}) and taken as others exit. Bounds the
    /// daemon's memory and the kernel's uprobes.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_processes: usize,
    /// Where the kubelet keeps `containers/` and `pods/` logs, whose names give each
    /// container's namespace, pod and container name (labels of its series).
    #[arg(long, default_value = "/var/log")]
    pub(crate) node_log_dir: PathBuf,
    /// Heap blocks the kernel tracks at once, across all watched processes; about 120
    /// bytes of kernel memory each, allocated at start. Up to an eighth of them may be
    /// entries of freed blocks, kept for the next block at the same address. Blocks beyond
    /// are counted in leakscope_heap_untracked_allocations_total{reason="outstanding_full"}.
    #[arg(long, default_value_t = monitor_common::heap::OUTSTANDING_MAX,
          value_parser = clap::value_parser!(u32).range(1024..=(1 << 24)))]
    pub(crate) heap_max_blocks: u32,
    /// Seconds between task censuses: reads of each runtime's own task lists from the
    /// process's memory (never stopped or written), which count the tasks spawned before
    /// leakscope attached (leakscope_tasks_alive_before_attach). The first runs at attach.
    /// 0 turns the census off.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) census_seconds: f64,
    /// Who counts tasks: `hooks` (a spawn and a completion hook, two traps per task: exact
    /// spawn and completion counts) or `census` (no task hook at all: each census lists
    /// the tasks alive per site; ages are "at least since first seen").
    #[arg(long, value_enum, default_value = "hooks")]
    pub(crate) tasks: TaskMode,
    /// How the heap probes report: `aggregate` (live figures per callsite and task site
    /// kept in the kernel and read periodically; an event only per new group) or `events`
    /// (one event per allocation and per free, applied by the daemon: its cost grows with
    /// the allocation rate). Both are exact.
    #[arg(long, value_enum, default_value = "aggregate")]
    pub(crate) heap_path: HeapPath,
    #[command(flatten)]
    pub(crate) heap_windows: HeapWindowConfig,
}

/// What makes a suspect (README, Verdicts); the defaults pass the fixtures' leaks and
/// non-leaks.
#[derive(Debug, Clone, Args)]
pub(crate) struct VerdictThresholds {
    /// One-sided Mann-Kendall p-value below which a rise over the window counts.
    #[arg(long, default_value_t = 0.01)]
    pub(crate) verdict_p_value: f64,
    /// Tasks a spawn site must gain over the window.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) verdict_min_tasks: f64,
    /// Bytes per second a heap callsite must gain (slower leaks are left to the
    /// predict_linear alert).
    #[arg(long, default_value_t = 16384.0)]
    pub(crate) verdict_min_heap_bytes_per_second: f64,
    /// Share of its size at the window's start a heap callsite must gain.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) verdict_min_heap_growth_ratio: f64,
}

impl VerdictThresholds {
    pub(crate) fn apply(&self, mut config: AnalysisConfig) -> AnalysisConfig {
        config.thresholds.p_value = self.verdict_p_value;
        config.thresholds.min_task_growth = self.verdict_min_tasks;
        config.thresholds.min_heap_growth_per_second = self.verdict_min_heap_bytes_per_second;
        config.thresholds.min_heap_growth_ratio = self.verdict_min_heap_growth_ratio;
        config
    }
}

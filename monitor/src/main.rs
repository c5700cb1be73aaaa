//! `leakscope`: the command line. Errors become one readable message (anyhow) here, at the
//! edge; the library modules below keep typed errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use leakscope::analysis::AnalysisConfig;
use leakscope::bpf::preflight;
use leakscope::daemon::census::TaskMode;
use leakscope::daemon::heap::{HeapMode, HeapPath};
use leakscope::daemon::heap_window::HeapWindowConfig;
use leakscope::daemon::{self, DaemonConfig, config_file, report, web_config};
use leakscope::export::inspect;
use leakscope::export::report as report_table;
use leakscope::export::top;
use leakscope::targets::select::Selection;
use leakscope::targets::workload::NodeFiles;

#[derive(Debug, Parser)]
#[command(
    name = "leakscope",
    version,
    about = "Find task and heap leaks in running tokio services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
struct DaemonArgs {
    /// Read settings from this TOML file (see README, "Config file"); flags given on
    /// the command line win over it. Default: /etc/leakscope/config.toml when it exists.
    /// SIGHUP reads it again.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    targets: Targets,
    /// Address for /metrics, /healthz and the JSON API (/api/v1/tasks, /api/v1/heap,
    /// /api/v1/suspects, /api/v1/sites).
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// TLS, client certificates and basic auth for --listen, from a YAML file in the
    /// format of Prometheus' exporter-toolkit (README, "The listener"). Without it the
    /// API is plain HTTP, open to whoever reaches the address.
    #[arg(long)]
    web_config: Option<PathBuf>,
    /// Seconds between checks for exited and newly started targets.
    #[arg(long, default_value_t = 1.0)]
    rescan_seconds: f64,
    /// Heap tracking: `off` (task tracking only), `exact` (every allocation of the
    /// watched processes, ~2.6 µs per allocate+free), `sampled` (1 in 16 blocks,
    /// figures scaled; ~1.8 µs) or `adaptive` (probes only in bounded windows, when a
    /// process's memory grows beyond what its tasks hold: --heap-window-*). See README for
    /// why the default is off.
    #[arg(long, value_enum, default_value = "off")]
    heap: HeapMode,
    /// Export leakscope_probe_runs_total and leakscope_probe_run_seconds_total: how often
    /// each of leakscope's BPF programs ran in the watched processes and for how long.
    /// Turns on the kernel's BPF statistics while the daemon runs, which adds two clock
    /// reads to every BPF program run on the host.
    #[arg(long)]
    probe_stats: bool,
    /// Seconds of history a leak verdict looks at; a site is judged once half of it is
    /// sampled.
    #[arg(long, default_value_t = 120.0)]
    verdict_window_seconds: f64,
    /// Seconds between the samples verdicts are made from.
    #[arg(long, default_value_t = 5.0)]
    verdict_sample_seconds: f64,
    #[command(flatten)]
    thresholds: VerdictThresholds,
    /// Log lines as text (journald's priority prefixes when run under systemd) or as one
    /// JSON object per line.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The config file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG: &str = "/etc/leakscope/config.toml";

/// Which processes to watch.
#[derive(Debug, Clone, Args)]
struct Targets {
    /// Process to watch (repeatable).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Watch every process running this executable, now and as they start (repeatable).
    #[arg(long = "exe")]
    exes: Vec<PathBuf>,
    /// Watch every tokio service on the host, now and as they start (executables are
    /// recognised by their code; the host's init and leakscope itself never are). What
    /// `leakscope daemon` does when given no --pid and no --exe.
    #[arg(long)]
    all: bool,
    /// Host-wide mode: only executables whose path starts with this.
    #[arg(long, default_value = "/")]
    all_under: PathBuf,
    /// Host-wide mode: watch only processes matching one of these KEY=GLOB rules (repeatable;
    /// KEY: exe, unit, namespace, pod, container; e.g. --include unit='payments*.service').
    #[arg(long)]
    include: Vec<String>,
    /// Host-wide mode: never watch processes matching one of these rules (repeatable; wins over
    /// --include; e.g. --exclude namespace=kube-system).
    #[arg(long)]
    exclude: Vec<String>,
    /// Host-wide mode: processes watched at most at once; more are counted
    /// (leakscope_host_processes{state="over_limit"}) and taken as others exit. Bounds the
    /// daemon's memory and the kernel's uprobes.
    #[arg(long, default_value_t = 256)]
    max_processes: usize,
    /// Where the kubelet keeps `containers/` and `pods/` logs, whose names give each
    /// container's namespace, pod and container name (labels of its series).
    #[arg(long, default_value = "/var/log")]
    node_log_dir: PathBuf,
    /// Heap blocks the kernel tracks at once, across all watched processes; about 120
    /// bytes of kernel memory each, allocated at start. Up to an eighth of them may be
    /// entries of freed blocks, kept for the next block at the same address. Blocks beyond
    /// are counted in leakscope_heap_untracked_allocations_total{reason="outstanding_full"}.
    #[arg(long, default_value_t = monitor_common::heap::OUTSTANDING_MAX,
          value_parser = clap::value_parser!(u32).range(1024..=(1 << 24)))]
    heap_max_blocks: u32,
    /// Seconds between task censuses: reads of each runtime's own task lists from the
    /// process's memory (never stopped or written), which count the tasks spawned before
    /// leakscope attached (leakscope_tasks_alive_before_attach). The first runs at attach.
    /// 0 turns the census off.
    #[arg(long, default_value_t = 10.0)]
    census_seconds: f64,
    /// Who counts tasks: `hooks` (a spawn and a completion hook, two traps per task: exact
    /// spawn and completion counts) or `census` (no task hook at all: each census lists
    /// the tasks alive per site; ages are "at least since first seen").
    #[arg(long, value_enum, default_value = "hooks")]
    tasks: TaskMode,
    /// How the heap probes report: `aggregate` (live figures per callsite and task site
    /// kept in the kernel and read periodically; an event only per new group) or `events`
    /// (one event per allocation and per free, applied by the daemon: its cost grows with
    /// the allocation rate). Both are exact.
    #[arg(long, value_enum, default_value = "aggregate")]
    heap_path: HeapPath,
    #[command(flatten)]
    heap_windows: HeapWindowConfig,
}

/// What makes a suspect (README, Verdicts); the defaults pass the fixtures' leaks and
/// non-leaks.
#[derive(Debug, Clone, Args)]
struct VerdictThresholds {
    /// One-sided Mann-Kendall p-value below which a rise over the window counts.
    #[arg(long, default_value_t = 0.01)]
    verdict_p_value: f64,
    /// Tasks a spawn site must gain over the window.
    #[arg(long, default_value_t = 3.0)]
    verdict_min_tasks: f64,
    /// Bytes per second a heap callsite must gain (slower leaks are left to the
    /// predict_linear alert).
    #[arg(long, default_value_t = 16384.0)]
    verdict_min_heap_bytes_per_second: f64,
    /// Share of its size at the window's start a heap callsite must gain.
    #[arg(long, default_value_t = 0.05)]
    verdict_min_heap_growth_ratio: f64,
}

impl VerdictThresholds {
    fn apply(&self, mut config: AnalysisConfig) -> AnalysisConfig {
        config.thresholds.p_value = self.verdict_p_value;
        config.thresholds.min_task_growth = self.verdict_min_tasks;
        config.thresholds.min_heap_growth_per_second = self.verdict_min_heap_bytes_per_second;
        config.thresholds.min_heap_growth_ratio = self.verdict_min_heap_growth_ratio;
        config
    }
}

/// Where Debian/Ubuntu x86_64 keep glibc: what an executable given by path would map.
const SYSTEM_LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// One line per event on stderr: plain text, with journald's `<N>` priority prefixes (and
/// no timestamp, which the journal adds) when stderr is the journal, or one JSON object per
/// line for log pipelines.
fn init_logging(default_level: &str, format: LogFormat) {
    use std::io::Write as _;
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level));
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = serde_json::json!({
                "ts": buf.timestamp().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    } else if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|buf, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{priority}>{}: {}", record.target(), record.args())
        });
    }
    builder.init();
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    // A report's own output is the table: the daemon's progress lines would bury it.
    let default_level = match cli.command {
        Command::Report { .. } => "warn",
        // Log lines would be written over the screen.
        Command::Top { .. } => "off",
        _ => "info",
    };
    let log_format = match &cli.command {
        Command::Daemon(args) => args.log_format,
        _ => LogFormat::Text,
    };
    init_logging(default_level, log_format);
    let report = matches!(cli.command, Command::Report { .. });
    match run(cli, &matches) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("leakscope: error: {err:#}");
            // `report` promises 2 on error (1 means suspects found).
            if report {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn daemon_config(
    targets: Targets,
    heap: HeapMode,
    analysis: AnalysisConfig,
) -> anyhow::Result<DaemonConfig> {
    if targets.tasks == TaskMode::Census && targets.census_seconds <= 0.0 {
        bail!("--tasks census needs a census: --census-seconds must be above 0");
    }
    Ok(DaemonConfig {
        select: Selection::parse(&targets.include, &targets.exclude)?,
        max_processes: targets.max_processes,
        pids: targets.pids,
        exes: targets.exes,
        host: targets.all.then_some(targets.all_under),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        web_config: None,
        rescan: Duration::from_secs(1),
        heap,
        heap_max_blocks: targets.heap_max_blocks,
        heap_path: targets.heap_path,
        heap_windows: targets.heap_windows,
        probe_stats: false,
        analysis,
        node: NodeFiles {
            log_dir: targets.node_log_dir,
        },
        census: Duration::from_secs_f64(targets.census_seconds.max(0.0)),
        tasks: targets.tasks,
    })
}

/// The daemon's settings: its flags, over the config file's (`--config`, or
/// [`DEFAULT_CONFIG`] when it exists), over the defaults.
fn daemon_settings(args: DaemonArgs, given: &ArgMatches) -> anyhow::Result<DaemonConfig> {
    let DaemonArgs {
        config,
        mut targets,
        mut listen,
        mut web_config,
        mut rescan_seconds,
        mut heap,
        mut probe_stats,
        mut verdict_window_seconds,
        mut verdict_sample_seconds,
        mut thresholds,
        log_format: _,
    } = args;
    let config = config.or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.exists().then_some(default)
    });
    if let Some(path) = config {
        let file = config_file::load(&path)?;
        // A setting of the file applies unless its flag was given.
        let from_file = |id: &str| given.value_source(id) != Some(ValueSource::CommandLine);
        macro_rules! take {
            ($id:literal, $field:expr, $value:expr) => {
                if from_file($id)
                    && let Some(value) = $value
                {
                    $field = value;
                }
            };
        }
        take!("listen", listen, file.listen);
        take!("web_config", web_config, file.web_config.map(Some));
        take!("heap", heap, file.heap);
        take!("probe_stats", probe_stats, file.probe_stats);
        take!("rescan_seconds", rescan_seconds, file.rescan_seconds);
        take!("pids", targets.pids, file.targets.pids);
        take!("exes", targets.exes, file.targets.exes);
        take!("all", targets.all, file.targets.all);
        take!("all_under", targets.all_under, file.targets.all_under);
        take!("include", targets.include, file.targets.include);
        take!("exclude", targets.exclude, file.targets.exclude);
        take!(
            "max_processes",
            targets.max_processes,
            file.targets.max_processes
        );
        take!(
            "node_log_dir",
            targets.node_log_dir,
            file.targets.node_log_dir
        );
        take!(
            "heap_max_blocks",
            targets.heap_max_blocks,
            file.targets.heap_max_blocks
        );
        take!(
            "census_seconds",
            targets.census_seconds,
            file.targets.census_seconds
        );
        take!("tasks", targets.tasks, file.targets.tasks);
        let v = file.verdicts;
        take!(
            "verdict_window_seconds",
            verdict_window_seconds,
            v.window_seconds
        );
        take!(
            "verdict_sample_seconds",
            verdict_sample_seconds,
            v.sample_seconds
        );
        take!("verdict_p_value", thresholds.verdict_p_value, v.p_value);
        take!(
            "verdict_min_tasks",
            thresholds.verdict_min_tasks,
            v.min_tasks
        );
        take!(
            "verdict_min_heap_bytes_per_second",
            thresholds.verdict_min_heap_bytes_per_second,
            v.min_heap_bytes_per_second
        );
        take!(
            "verdict_min_heap_growth_ratio",
            thresholds.verdict_min_heap_growth_ratio,
            v.min_heap_growth_ratio
        );
        targets.heap_windows.overlay(&file.heap_windows, |id| {
            given.value_source(id) == Some(ValueSource::CommandLine)
        });
    }
    // An installed daemon is given no pid: it watches the host.
    if targets.pids.is_empty() && targets.exes.is_empty() && !targets.all {
        log::info!("no --pid or --exe given: watching every tokio service on the host");
        targets.all = true;
    }
    let analysis = thresholds.apply(AnalysisConfig::new(
        verdict_sample_seconds,
        verdict_window_seconds,
    ));
    Ok(DaemonConfig {
        listen,
        web_config,
        rescan: Duration::from_secs_f64(rescan_seconds.max(0.05)),
        probe_stats,
        ..daemon_config(targets, heap, analysis)?
    })
}

fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Daemon(args) => {
            let given = matches
                .subcommand_matches("daemon")
                .expect("the daemon subcommand")
                .clone();
            let config = daemon_settings(args.clone(), &given)?;
            // SIGHUP: the same flags over the file as it is now.
            let reload = move || daemon_settings(args.clone(), &given);
            runtime()?.block_on(daemon::run(config, reload))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            targets,
            duration,
            heap,
            json,
            thresholds,
        } => {
            let duration = duration.max(1.0);
            // About 30 samples over the run, judged on the whole run.
            let analysis = thresholds.apply(AnalysisConfig::new(
                (duration / 30.0).clamp(0.1, 5.0),
                duration,
            ));
            let config = daemon_config(targets, heap, analysis)?;
            let verdicts = runtime()?.block_on(report::watch(&config, duration))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&verdicts)?);
            } else {
                print!("{}", report_table::render(&verdicts));
            }
            let suspects = verdicts
                .sites
                .iter()
                .any(|v| v.verdict == leakscope::export::api::Verdict::Suspect);
            Ok(if suspects {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Doctor => {
            let mut checks = preflight::static_checks();
            checks.extend(preflight::live_checks(std::path::Path::new(SYSTEM_LIBC)));
            for check in &checks {
                let mark = match check.status {
                    preflight::Status::Ok => "ok  ",
                    preflight::Status::Warning => "warn",
                    preflight::Status::Missing => "FAIL",
                };
                println!("{mark} {}", check.line());
            }
            Ok(match preflight::refusal(&checks) {
                None => {
                    println!("leakscope can run here");
                    ExitCode::SUCCESS
                }
                Some(_) => ExitCode::FAILURE,
            })
        }
        Command::CheckConfig { file, web_config } => {
            let config = file.as_deref().map(config_file::load).transpose()?;
            let web = web_config
                .or_else(|| config.as_ref()?.web_config.clone())
                // Its certificate files are read too: a bad path shows here, not at start.
                .map(|path| web_config::load(&path))
                .transpose()?;
            if let (Some(file), Some(config)) = (&file, &config) {
                println!("{}: ok\n{config:#?}", file.display());
            }
            if let Some(web) = web {
                let users: Vec<&String> = web.users.keys().collect();
                println!(
                    "{}: ok\ntls: {:#?}\nbasic auth users: {users:?}",
                    web.path.display(),
                    web.tls
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { binary, pid, json } => {
            let (path, libraries) = match (binary, pid) {
                // Not running: show the probes for this machine's libc, which it would map.
                (Some(path), _) => (
                    path,
                    [SYSTEM_LIBC]
                        .iter()
                        .map(std::path::PathBuf::from)
                        .filter(|p| p.exists())
                        .collect(),
                ),
                (None, Some(pid)) => (
                    leakscope::targets::procfs::process_info(pid)?.exe_link(),
                    leakscope::targets::maps::mapped_libraries(pid),
                ),
                (None, None) => unreachable!("clap requires one of them"),
            };
            // As the daemon would attach with heap tracking: a tokio binary whose tasks
            // cannot be read is shown heap-only, with the warning saying why.
            let image = leakscope::daemon::judge::analyze_for_attach(
                &path,
                &path.display().to_string(),
                true,
            )?;
            let allocators = leakscope::discovery::alloc::find_allocators(&path, &libraries)
                .context("finding the allocator")?;
            let heap_points = leakscope::bpf::plan::heap_points(&allocators);
            let out = if json {
                let mut value = serde_json::to_value(&image)?;
                value["allocator"] = serde_json::json!({
                    "global": allocators.global,
                    "evidence": allocators.evidence,
                    "heap_probes": heap_points,
                });
                serde_json::to_string_pretty(&value)? + "\n"
            } else {
                inspect::render_table(&image)
                    + &inspect::render_allocator(&allocators, &heap_points)
            };
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Top {
            api,
            targets,
            heap,
            verdict_window_seconds,
        } => {
            if targets.pids.is_empty() && targets.exes.is_empty() {
                let addr = api.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9464)));
                top::run(&addr.to_string(), top::api_source(addr))?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut source: Vec<String> = targets.pids.iter().map(|p| format!("pid {p}")).collect();
            source.extend(targets.exes.iter().map(|e| e.display().to_string()));
            let analysis = AnalysisConfig::new(top::REFRESH.as_secs_f64(), verdict_window_seconds);
            let config = daemon_config(targets, heap, analysis)?;
            let runtime = runtime()?;
            let mut session =
                runtime.block_on(leakscope::daemon::session::Session::start(&config))?;
            // The drain runs on the runtime's workers; sampling and rescans happen here.
            let _context = runtime.enter();
            top::run(&source.join(", "), move || {
                session.rescan();
                session.sample();
                if session.attached() == 0 {
                    return Err("no target process is attached (they exited)".to_string());
                }
                Ok(session
                    .analysis()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .sites())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

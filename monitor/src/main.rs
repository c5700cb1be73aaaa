//! `leakscope`: the command line. Errors become one readable message (anyhow) here, at the
//! edge; the library modules below keep typed errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use leakscope::analysis::AnalysisConfig;
use leakscope::daemon::heap::HeapMode;
use leakscope::daemon::{self, DaemonConfig, config_file, report, web_config};
use leakscope::export::inspect;
use leakscope::export::report as report_table;
use leakscope::export::top;

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
    Daemon {
        /// Read settings from this TOML file (see README, "Config file"); flags given on
        /// the command line win over it.
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
        /// watched processes, ~2.6 µs per allocate+free) or `sampled` (1 in 16 blocks,
        /// figures scaled; ~1.8 µs). See README for why the default is off.
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
    },
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

/// Which processes to watch.
#[derive(Debug, Args)]
struct Targets {
    /// Process to watch (repeatable).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Watch every process running this executable, now and as they start (repeatable).
    #[arg(long = "exe")]
    exes: Vec<PathBuf>,
    /// Watch every tokio service on the host, now and as they start (executables are
    /// recognised by their code; the host's init and leakscope itself never are).
    #[arg(long)]
    all: bool,
    /// With --all: only executables whose path starts with this.
    #[arg(long, default_value = "/", requires = "all")]
    all_under: PathBuf,
    /// Heap blocks the kernel tracks at once, across all watched processes; about 104
    /// bytes of kernel memory each, allocated at start. Blocks beyond are counted in
    /// leakscope_heap_untracked_allocations_total{reason="outstanding_full"}.
    #[arg(long, default_value_t = monitor_common::heap::OUTSTANDING_MAX,
          value_parser = clap::value_parser!(u32).range(1024..=(1 << 24)))]
    heap_max_blocks: u32,
}

/// What makes a suspect (README, Verdicts); the defaults pass the fixtures' leaks and
/// non-leaks.
#[derive(Debug, Args)]
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
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

fn daemon_config(targets: Targets, heap: HeapMode, analysis: AnalysisConfig) -> DaemonConfig {
    DaemonConfig {
        pids: targets.pids,
        exes: targets.exes,
        host: targets.all.then_some(targets.all_under),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        web_config: None,
        rescan: Duration::from_secs(1),
        heap,
        heap_max_blocks: targets.heap_max_blocks,
        probe_stats: false,
        analysis,
    }
}

fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Daemon {
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
        } => {
            if let Some(path) = config {
                let file = config_file::load(&path)?;
                let given = matches
                    .subcommand_matches("daemon")
                    .expect("the daemon subcommand");
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
                take!(
                    "heap_max_blocks",
                    targets.heap_max_blocks,
                    file.targets.heap_max_blocks
                );
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
            }
            let analysis = thresholds.apply(AnalysisConfig::new(
                verdict_sample_seconds,
                verdict_window_seconds,
            ));
            let config = DaemonConfig {
                listen,
                web_config,
                rescan: Duration::from_secs_f64(rescan_seconds.max(0.05)),
                probe_stats,
                ..daemon_config(targets, heap, analysis)
            };
            runtime()?.block_on(daemon::run(config))?;
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
            let config = daemon_config(targets, heap, analysis);
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
            let image = leakscope::discovery::analyze(&path)?;
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
            let config = daemon_config(targets, heap, analysis);
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

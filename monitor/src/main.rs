//! `leakscope`: the command line. Errors become one readable message (anyhow) here, at the
//! edge; the library modules below keep typed errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use leakscope::analysis::AnalysisConfig;
use leakscope::bpf::preflight;
use leakscope::daemon::census::TaskMode;
use leakscope::daemon::heap::HeapMode;
use leakscope::daemon::{self, DaemonConfig, config_file, report, web_config};
use leakscope::export::inspect;
use leakscope::export::report as report_table;
use leakscope::export::top;
use leakscope::targets::select::Selection;
use leakscope::targets::workload::NodeFiles;

mod cli;
use cli::{Cli, Command, DEFAULT_CONFIG, DaemonArgs, LogFormat, Targets};

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

//! `leakscope`: the command line. Errors become one readable message (anyhow) here, at the
//! edge; the library modules below keep typed errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use leakscope::daemon;
use leakscope::export::inspect;

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
    /// Attach to running processes and export per-spawn-site task counts.
    Daemon {
        /// Process to watch (repeatable).
        #[arg(long = "pid")]
        pids: Vec<u32>,
        /// Watch every process running this executable, now and as they start (repeatable).
        #[arg(long = "exe")]
        exes: Vec<PathBuf>,
        /// Address for /metrics, /healthz and /api/v1/tasks.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: SocketAddr,
        /// Seconds between checks for exited and newly started targets.
        #[arg(long, default_value_t = 1.0)]
        rescan_seconds: f64,
        /// Heap tracking: `off` (task tracking only), `exact` (every allocation of the
        /// watched processes, ~2.6 µs per allocate+free) or `sampled` (1 in 16 blocks,
        /// figures scaled; ~1.8 µs). See README for why the default is off.
        #[arg(long, value_enum, default_value = "off")]
        heap: leakscope::daemon::heap::HeapMode,
        /// Heap blocks the kernel tracks at once, across all watched processes; about 104
        /// bytes of kernel memory each, allocated at start. Blocks beyond are counted in
        /// leakscope_heap_untracked_allocations_total{reason="outstanding_full"}.
        #[arg(long, default_value_t = monitor_common::heap::OUTSTANDING_MAX,
              value_parser = clap::value_parser!(u32).range(1024..=(1 << 24)))]
        heap_max_blocks: u32,
        /// Export leakscope_probe_runs_total and leakscope_probe_run_seconds_total: how often
        /// each of leakscope's BPF programs ran in the watched processes and for how long.
        /// Turns on the kernel's BPF statistics while the daemon runs, which adds two clock
        /// reads to every BPF program run on the host.
        #[arg(long)]
        probe_stats: bool,
    },
    /// Show the spawn sites and hook points leakscope finds in a binary (no root needed).
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
}

/// Where Debian/Ubuntu x86_64 keep glibc: what an executable given by path would map.
const SYSTEM_LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("leakscope: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon {
            pids,
            exes,
            listen,
            rescan_seconds,
            heap,
            heap_max_blocks,
            probe_stats,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(daemon::DaemonConfig {
                pids,
                exes,
                listen,
                rescan: Duration::from_secs_f64(rescan_seconds.max(0.05)),
                heap,
                heap_max_blocks,
                probe_stats,
            }))
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
            Ok(())
        }
    }
}

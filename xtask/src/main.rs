//! Project tasks: `cargo xtask setup | fixtures | test | fuzz | bench | demo | soak`.
//!
//! Everything a fresh machine needs is installed from here (nothing done by hand survives a
//! new machine), and `test` is exactly what CI runs.

mod bench;
mod bench_adaptive;
mod bench_attach;
mod bench_census;
mod bench_host;
mod bench_http;
mod bench_scale;
mod bench_tools;
mod demo;
mod fuzz;
mod soak;
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing leakscope needs: nightly rust-src, bpf-linker,
    /// cargo-fuzz, the Debian packages the tests drive (prometheus, tmux, systemd-analyze,
    /// bpftool), kubernetes-validate and checkov (pip). Idempotent.
    Setup {
        /// Also what `bench --http` drives: wrk, bcc's memleak (bpfcc-tools) and the kernel
        /// headers memleak compiles against (Debian's closest, linked under /lib/modules).
        #[arg(long)]
        bench: bool,
    },
    /// Build the fixture programs (release profile) the tests and the demo run.
    Fixtures,
    /// fmt check, clippy, unit and eBPF integration tests, then each fuzz target for 20 s
    /// and a 2-minute soak (what CI runs; a filtered run skips the fuzzing and the soak).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        cargo_test_args: Vec<String>,
    },
    /// Fuzz what leakscope reads from outside (binaries, .eh_frame, DWARF, kernel events,
    /// the config file), with corpora seeded from the fixtures; a crash or hang fails.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (elf_discovery, symbol_names, eh_frame, dwarf_lines, ring_events,
        /// config_file).
        #[arg(long)]
        target: Option<String>,
        /// Start from the seeds alone, in a fresh corpus, as `test` does (by default the
        /// corpus grown by earlier runs is kept in monitor/fuzz/corpus).
        #[arg(long)]
        seeds_only: bool,
    },
    /// Overhead of the hooks: task and heap microbenchmarks, baseline vs monitored, side by
    /// side.
    Bench {
        /// Alternating rounds per comparison; the report gives medians (default 5, with
        /// `--http` and `--attach` 3).
        #[arg(long)]
        rounds: Option<usize>,
        /// Only host-wide mode at scale: 50 services found, attached and held in memory.
        #[arg(long, conflicts_with = "http")]
        host: bool,
        /// Only the task census of 100,000 tasks spawned before attach: time to count
        /// them, one census's wall and CPU time, the daemon's memory.
        #[arg(long, conflicts_with_all = ["http", "host"])]
        census: bool,
        /// Only the daemon at scale: one process with 100 000 live tasks and 1 000 000 live
        /// heap blocks (--heap exact): its memory, its maps' kernel memory, CPU per event.
        #[arg(long, conflicts_with_all = ["http", "host", "heap"])]
        scale: bool,
        /// Only the heap microbenchmarks (allocate+free loops, each hook's BPF time, the
        /// daemon's CPU on each heap path).
        #[arg(long, conflicts_with_all = ["http", "host"])]
        heap: bool,
        /// Only the attach time on a large service: a generated ~50 MB tokio binary (built
        /// into target/), `leakscope inspect` and `daemon --pid` until attached, with and
        /// without `--heap exact`; writes target/bench/attach.json.
        #[arg(long, conflicts_with_all = ["http", "host", "census", "scale", "heap"])]
        attach: bool,
        /// Only the HTTP benchmark: the axum fixture under wrk, unmonitored and under each
        /// monitor (task hooks, heap exact on both heap paths, heap sampled, bcc memleak);
        /// writes target/bench/summary.{json,md,svg}.
        #[arg(long)]
        http: bool,
        /// With --http: one round of 5 s runs (about 8 minutes) instead of 3 rounds of 10 s.
        #[arg(long, requires = "http")]
        quick: bool,
        /// Only `--heap adaptive` left on for a long run (see --minutes): the watched
        /// service's throughput against an unwatched copy's, and how soon the seed's
        /// growing-state leak, started part way through, becomes a heap suspect; writes
        /// target/bench/adaptive.{json,md}.
        #[arg(long, conflicts_with_all = ["http", "host", "heap", "scale", "census", "attach"])]
        adaptive: bool,
        /// With --adaptive: the run's length.
        #[arg(long, requires = "adaptive", default_value_t = 10.0)]
        minutes: f64,
    },
    /// Run a leaky fixture under load with leakscope attached and show the suspects.
    Demo {
        /// How long to drive load and refresh the table, in seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// The fixture under bounded load while daemons attach, detach, get SIGKILLed and
    /// restart on it in a loop: no crash, identical answers, flat daemon RSS, no BPF
    /// program or link left behind; prints a summary.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Soak the debug build of the daemon (as `cargo xtask test` does) instead of the
        /// release build.
        #[arg(long)]
        debug: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup { bench } => {
            setup()?;
            if bench {
                match bench_tools::setup_bench()? {
                    Ok(headers) => eprintln!("xtask: {headers}"),
                    Err(reason) => eprintln!(
                        "xtask: memleak cannot run here, `bench --http` will leave its column \
                         empty: {reason}"
                    ),
                }
            }
            Ok(())
        }
        Task::Fixtures => {
            setup()?;
            fixtures()
        }
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Fuzz {
            seconds,
            target,
            seeds_only,
        } => {
            setup()?;
            fixtures()?;
            let corpus = if seeds_only {
                fuzz::Corpus::SeedsOnly
            } else {
                fuzz::Corpus::Kept
            };
            fuzz::fuzz(seconds, target.as_deref(), corpus, None)
        }
        Task::Demo { seconds } => {
            setup()?;
            fixtures()?;
            demo::demo(seconds)
        }
        Task::Soak { minutes, debug } => {
            setup()?;
            fixtures()?;
            let build = if debug {
                soak::Build::Debug
            } else {
                soak::Build::Release
            };
            soak::soak(minutes, build)
        }
        Task::Bench {
            rounds,
            host,
            census,
            scale,
            heap,
            attach,
            http,
            quick,
            adaptive,
            minutes,
        } => {
            setup()?;
            fixtures()?;
            if adaptive {
                run(cargo().args(["build", "--release", "-p", "monitor"]))?;
                return bench_adaptive::adaptive_bench(
                    bench_adaptive::Options { minutes },
                    &workspace_root().join("target/release/leakscope"),
                );
            }
            if http {
                return bench_http::http_bench(bench_http::Options {
                    quick,
                    rounds: rounds.unwrap_or(3),
                });
            }
            if attach {
                run(cargo().args(["build", "--release", "-p", "monitor"]))?;
                return bench_attach::attach_bench(
                    &workspace_root().join("target/release/leakscope"),
                    rounds.unwrap_or(3).max(1),
                );
            }
            if host {
                run(cargo().args(["build", "--release", "-p", "monitor"]))?;
                return bench_host::host_bench(&workspace_root().join("target/release/leakscope"));
            }
            if census {
                run(cargo().args(["build", "--release", "-p", "monitor"]))?;
                return bench_census::census_bench(
                    &workspace_root().join("target/release/leakscope"),
                );
            }
            if scale {
                run(cargo().args(["build", "--release", "-p", "monitor"]))?;
                return bench_scale::scale_bench(
                    &workspace_root().join("target/release/leakscope"),
                );
            }
            if heap {
                run(cargo().args(["build", "--release", "-p", "monitor"]))?;
                return bench::heap_bench(rounds.unwrap_or(5).max(1));
            }
            bench::bench(rounds.unwrap_or(5).max(1))
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command to completion, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: $ {shown}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// nightly + rust-src (for `-Z build-std=core` of the BPF target) and bpf-linker built
/// against nightly's own libLLVM, so the two always agree on the LLVM version.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

fn setup() -> anyhow::Result<()> {
    output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).context(
        "the `nightly` toolchain is missing: install it with `rustup toolchain install nightly`",
    )?;
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // A static musl build of the heap fixture: the allocator is linked into the binary.
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|l| l.trim() == MUSL_TARGET) {
        run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    install_debian_tools()?;
    install_python_tools()?;
    install_cargo_fuzz()?;
    // bpf-linker links against nightly's libLLVM, which is on the library path only under
    // `rustup run nightly` (as aya-build runs it).
    if Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    install_bpf_linker()
}

/// Outside tools the tests drive, as (command, Debian package): promtool and a real
/// Prometheus for the alert rules, tmux for `leakscope top`'s screen, systemd-analyze for
/// the unit file, bpftool for the soak's check that no BPF program or link outlives a daemon.
const DEBIAN_TOOLS: [(&str, &str); 5] = [
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("tmux", "tmux"),
    ("systemd-analyze", "systemd"),
    ("bpftool", "bpftool"),
];

pub fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

fn install_debian_tools() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = DEBIAN_TOOLS
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|&(_, package)| package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !on_path("apt-get") {
        bail!(
            "the tests need {} (Debian packages {}): install them with your package manager",
            DEBIAN_TOOLS.map(|(command, _)| command).join(", "),
            missing.join(" ")
        );
    }
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
    .context("installing the tools the tests drive (as root)")
}

/// kubernetes-validate (PyPI) checks the manifests against Kubernetes' schemas, checkov
/// (PyPI) against its security policies.
fn install_python_tools() -> anyhow::Result<()> {
    let tools: [(&str, &[&str]); 2] = [
        (
            "kubernetes-validate",
            &["python3", "-m", "kubernetes_validate", "--version"],
        ),
        ("checkov", &["checkov", "--version"]),
    ];
    for (package, probe) in tools {
        let present = Command::new(probe[0])
            .args(&probe[1..])
            .output()
            .is_ok_and(|o| o.status.success());
        if present {
            continue;
        }
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            package,
        ]))
        .with_context(|| format!("installing {package} (pip) for the manifest tests"))?;
    }
    Ok(())
}

/// cargo-fuzz (crates.io) drives the fuzz targets in `monitor/fuzz`.
fn install_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
        .context("installing cargo-fuzz for the fuzz targets")
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` does not say its LLVM version")?
        .to_string();
    let prefix = workspace_root().join("target/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "--locked",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))
    .context("building bpf-linker against nightly's libLLVM")
}

/// Fixture binaries, all in the default release profile, as a user would build them.
pub struct Fixtures {
    pub axum_app: PathBuf,
    pub axum_app_lts: PathBuf,
    pub axum_app_stripped: PathBuf,
}

pub fn fixture_paths() -> Fixtures {
    let release = workspace_root().join("target/release");
    Fixtures {
        axum_app: release.join("axum-app"),
        axum_app_lts: release.join("axum-app-lts"),
        axum_app_stripped: release.join("axum-app-stripped"),
    }
}

/// The tokio lines the tokio-lines fixture is built against (`tokio-lines/tokio-<line>/`,
/// binary `target/release/tokio-lines-<line>-0`): each task layout tokio 1.x has had before
/// the one the axum fixtures use, and two lines since (`bind_inner` from 1.30 on).
const TOKIO_LINES: [&str; 8] = [
    "1-8", "1-10", "1-18", "1-22", "1-25", "1-28", "1-32", "1-43",
];

fn fixtures() -> anyhow::Result<()> {
    let root = workspace_root();
    run(cargo().args(["build", "--release", "-p", "axum-app"]))?;
    // The LTS fixture pins an older tokio, so it is its own workspace; it shares the target
    // directory to reuse what both versions have in common.
    run(cargo()
        .args(["build", "--release", "--manifest-path"])
        .arg(root.join("monitor/tests/fixtures/axum-app-lts/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target")))?;
    // The tokio-lines fixture against each pinned tokio line: one workspace per line, built
    // one after the other into the shared target directory (each takes seconds: `rt` only).
    for line in TOKIO_LINES {
        run(cargo()
            .args(["build", "--release", "--manifest-path"])
            .arg(root.join(format!(
                "monitor/tests/fixtures/tokio-lines/tokio-{line}/Cargo.toml"
            )))
            .arg("--target-dir")
            .arg(root.join("target")))?;
    }
    // The 1.10 line stripped: a tokio binary whose tasks cannot be read (its vtables have
    // no offsets to find them by shape), for heap tracking without task discovery.
    run(Command::new("strip")
        .arg("-o")
        .arg(root.join("target/release/tokio-lines-1-10-0-stripped"))
        .arg(root.join("target/release/tokio-lines-1-10-0")))?;
    // The heap fixture under each global allocator leakscope supports.
    run(cargo().args(["build", "--release", "-p", "heap-app"]))?;
    for allocator in ["jemalloc", "mimalloc"] {
        run(cargo()
            .args([
                "build",
                "--release",
                "-p",
                "heap-app",
                "--features",
                allocator,
            ])
            .arg("--target-dir")
            .arg(root.join(format!("target/fixtures-{allocator}"))))?;
    }
    // Statically linked against musl: no libc.so, its malloc lives in the executable.
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "heap-app",
        "--target",
        MUSL_TARGET,
    ]))?;
    // A copy with line tables, as a user who sets `debug = "line-tables-only"` builds it, for
    // the file:line of spawn sites. Its own target dir: other flags, other artifacts.
    run(cargo()
        .env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only")
        .args(["build", "--release", "-p", "axum-app", "--target-dir"])
        .arg(root.join("target/fixtures-dwarf")))?;
    let paths = fixture_paths();
    run(Command::new("strip")
        .arg("-o")
        .arg(&paths.axum_app_stripped)
        .arg(&paths.axum_app))?;
    // Production practice: symbols kept aside in a debug file, the shipped binary stripped
    // and linked to it by `.gnu_debuglink` (name + CRC32). Once as released (symbols only)
    // and once from the line-tables build (symbols + DWARF). `objcopy` is binutils, like
    // `strip`.
    let dwarf = root.join("target/fixtures-dwarf/release/axum-app");
    for unstripped in [&paths.axum_app, &dwarf] {
        let dir = unstripped.parent().expect("fixture in a directory");
        let debug = dir.join("axum-app.debug");
        let linked = dir.join("axum-app-stripped-debuglink");
        run(Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(unstripped)
            .arg(&debug))?;
        run(Command::new("strip").arg("-o").arg(&linked).arg(unstripped))?;
        // The link names the debug file by file name only, so run where both are.
        run(Command::new("objcopy")
            .current_dir(dir)
            .arg("--add-gnu-debuglink=axum-app.debug")
            .arg(&linked))?;
    }
    Ok(())
}

/// How long `test` runs each fuzz target: six targets stay near two minutes, enough to
/// catch what a change breaks in the seeds' neighbourhood. Longer runs: `cargo xtask fuzz`.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

fn test(cargo_test_args: &[String]) -> anyhow::Result<()> {
    setup()?;
    // A filtered run is someone iterating on a few tests: the fuzzers and the soak are not
    // theirs.
    let whole = cargo_test_args.is_empty();
    let fuzz_build = whole.then(fuzz::BackgroundBuild::start).transpose()?;
    run(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    // The fuzz crate is its own workspace (it needs nightly), so `--all` does not cover it.
    run(cargo()
        .args(["fmt", "--check", "--manifest-path"])
        .arg(workspace_root().join("monitor/fuzz/Cargo.toml")))
    .context("formatting differs: run `cargo fmt --manifest-path monitor/fuzz/Cargo.toml`")?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    fixtures()?;
    run(cargo().args(["test"]).args(cargo_test_args))?;
    if !whole {
        eprintln!("xtask: a test filter was given: the fuzzing and the soak are left out");
        return Ok(());
    }
    // The fuzzers keep one core busy and the soak mostly waits on its daemons and fixture,
    // so they run side by side: two minutes off the run.
    std::thread::scope(|scope| {
        // Churn as a long-running host sees it, in 2 minutes (about 16 daemons started and
        // ended), with the daemon the tests just built; `cargo xtask soak --minutes N` runs
        // the release build, longer.
        let soak = scope.spawn(|| soak::soak(2.0, soak::Build::Debug));
        let fuzzed = fuzz::fuzz(
            FUZZ_SECONDS_IN_TEST,
            None,
            fuzz::Corpus::SeedsOnly,
            fuzz_build,
        );
        let soaked = soak
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the soak panicked")));
        match (fuzzed, soaked) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(err), Ok(())) | (Ok(()), Err(err)) => Err(err),
            (Err(fuzz), Err(soak)) => {
                Err(fuzz.context(format!("and the soak failed too: {soak:#}")))
            }
        }
    })
}

//! Heap lifetimes end to end: a fixture allocates known sizes from known callsites (under the
//! system allocator, jemalloc and mimalloc), `leakscope daemon --heap exact` watches it, and
//! the live bytes per callsite must match what the fixture says it holds.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);
const TASK: &str = "heap_app::main::{{closure}}::{{closure}}";

/// Starts `leakscope daemon --pid PID --heap MODE` and waits until it has attached.
fn start_heap_daemon(pid: u32, mode: &str) -> (Proc, SocketAddr) {
    start_heap_daemon_with(pid, mode, &[])
}

/// [`start_heap_daemon`] with extra daemon arguments.
fn start_heap_daemon_with(pid: u32, mode: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec![
        "--pid".into(),
        pid.to_string(),
        "--heap".into(),
        mode.into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let (proc, daemon) = start_daemon(&args);
    wait_attached(daemon, pid);
    (proc, daemon)
}

/// Kernel memory held by the BPF maps process `pid` has open, from the `memlock:` line the
/// kernel shows in each map fd's fdinfo.
fn bpf_map_memlock(pid: u32) -> u64 {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the daemon's fds");
    fds.filter_map(|fd| {
        let fd = fd.ok()?;
        let target = std::fs::read_link(fd.path()).ok()?;
        if target.to_str()? != "anon_inode:bpf-map" {
            return None;
        }
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_str()?))
                .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
    })
    .sum()
}

fn site_bytes(live: &BTreeMap<(String, String), f64>, site: &str) -> f64 {
    live.iter()
        .filter(|((s, _), _)| s == site)
        .map(|(_, v)| v)
        .sum()
}

/// Polls until every callsite the fixture reports holds within 1 % of its figure (and is
/// attributed to `expected_task(site)`), then returns the last scrape.
fn expect_held(
    daemon: SocketAddr,
    pid: u32,
    held: &BTreeMap<String, f64>,
    expected_task: impl Fn(&str) -> &'static str,
) {
    eventually(
        "live bytes per callsite match the fixture",
        DEADLINE,
        || {
            let live = live_bytes(daemon, pid);
            for (site, &bytes) in held {
                let got = site_bytes(&live, site);
                if (got - bytes).abs() > bytes * 0.01 {
                    return Err(format!(
                        "{site}: fixture holds {bytes}, leakscope says {got}; {live:?}"
                    ));
                }
                if bytes > 0.0 {
                    let task = expected_task(site);
                    if !live.contains_key(&(site.clone(), task.to_string())) {
                        return Err(format!("{site}: no series with task_site={task}: {live:?}"));
                    }
                }
            }
            Ok(())
        },
    );
}

fn callsites_match_under(binary: PathBuf, allocator: &str) {
    let test = format!("heap callsites under {allocator}");
    if !ebpf_available(&test) {
        return;
    }
    assert!(
        binary.exists(),
        "{} is missing: build fixtures first with `cargo xtask fixtures`",
        binary.display()
    );
    let mut app = HeapApp::start(binary);
    let pid = app.proc.pid();
    let (_daemon, daemon) = start_heap_daemon(pid, "exact");
    let task_or_thread = |site: &str| {
        if site == "heap_app::cross_thread_block" {
            "none" // allocated on a plain std thread, outside any tokio task
        } else {
            TASK
        }
    };

    app.command("grow 100000");
    app.command("cache 200");
    app.command("big 3");
    app.command("zeroed 2");
    app.command("aligned 5");
    // Straight from libc's malloc, as C code allocates: seen through libc's hooks, also
    // where Rust's allocations go to jemalloc or mimalloc.
    app.command("cmalloc 6");
    let held = app.command("cross 4");
    expect_held(daemon, pid, &held, task_or_thread);

    // The cache plateaus: more inserts, same bytes.
    let held = app.command("cache 500");
    expect_held(daemon, pid, &held, task_or_thread);

    // Freed memory leaves the gauges.
    let released = app.command("release");
    assert!(released.values().all(|&v| v == 0.0), "{released:?}");
    expect_held(
        daemon,
        pid,
        &held.keys().map(|k| (k.clone(), 0.0)).collect(),
        task_or_thread,
    );

    let samples = scrape(daemon);
    let total = |family: &str| {
        samples
            .iter()
            .find(|s| s.name == family && s.labels.get("pid") == Some(&pid.to_string()))
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no {family} for pid {pid}"))
    };
    assert!(
        total("leakscope_heap_freed_bytes_total") >= 1_000_000.0,
        "freed bytes not counted"
    );
    assert!(
        total("leakscope_heap_allocated_bytes_total") >= total("leakscope_heap_freed_bytes_total")
    );

    // When the process exits, its heap state goes with it.
    app.command("big 2");
    drop(app);
    eventually(
        "the exited process's heap series are gone",
        DEADLINE,
        || {
            let left = scrape(daemon)
                .iter()
                .filter(|s| {
                    s.name.starts_with("leakscope_heap_")
                        && s.labels.get("pid") == Some(&pid.to_string())
                })
                .count();
            (left == 0)
                .then_some(())
                .ok_or(format!("{left} series left"))
        },
    );
}

#[test]
fn callsites_are_exact_under_the_system_allocator() {
    callsites_match_under(workspace_root().join("target/release/heap-app"), "system");
}

#[test]
fn callsites_are_exact_under_jemalloc() {
    callsites_match_under(
        workspace_root().join("target/fixtures-jemalloc/release/heap-app"),
        "jemalloc",
    );
}

#[test]
fn callsites_are_exact_under_mimalloc() {
    callsites_match_under(
        workspace_root().join("target/fixtures-mimalloc/release/heap-app"),
        "mimalloc",
    );
}

#[test]
fn callsites_are_exact_in_a_static_musl_binary() {
    callsites_match_under(
        workspace_root().join("target/x86_64-unknown-linux-musl/release/heap-app"),
        "musl",
    );
}

/// The seed's third pattern: a handler whose un-awaited task pushes 256 KiB per request into
/// shared state, next to its remedy (awaited, bounded state).
#[test]
fn state_grown_by_an_unawaited_task_is_found_and_its_remedy_is_not() {
    seed_pattern_three("axum-app");
}

/// The same against a stripped copy whose symbols live in a separate debug file (how
/// production binaries ship): names come from the debug file, probes go into libc.
#[test]
fn state_leak_is_found_in_a_stripped_binary_with_a_debug_file() {
    seed_pattern_three("axum-app-stripped-debuglink");
}

fn seed_pattern_three(binary: &str) {
    if !ebpf_available(&format!("seed pattern three on {binary}")) {
        return;
    }
    let (app, addr) = start_fixture(&fixture(binary), &[]);
    let pid = app.pid();
    let (_daemon, daemon) = start_heap_daemon(pid, "exact");
    const REQUESTS: usize = 60;
    for _ in 0..REQUESTS {
        get_ok(addr, "/state/leak");
        get_ok(addr, "/state/ok");
    }
    expect_state_leak_found(daemon, pid, REQUESTS);
}

/// `Anonymous:` kB of the executable mappings of `path_part` in `/proc/PID/smaps`: a uprobe
/// breakpoint turns the patched page of a file mapping into a private anonymous copy.
fn patched_kb(pid: u32, path_part: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut in_target = false;
    let mut total = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 5 && fields[0].contains('-') && !line.ends_with(" kB") {
            in_target = fields[1].contains('x') && line.contains(path_part);
        } else if in_target && let Some(kb) = line.strip_prefix("Anonymous:") {
            total += kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    total
}

/// Probes are per process: a second process running the same executable and calling
/// `malloc` in a loop (`bench`) is neither slowed by breakpoints nor reported, although it
/// shares the binary and libc with the watched one.
#[test]
fn an_unwatched_process_is_not_patched_and_not_reported() {
    if !ebpf_available("an_unwatched_process_is_not_patched_and_not_reported") {
        return;
    }
    let binary = workspace_root().join("target/release/heap-app");
    let mut watched = HeapApp::start(binary.clone());
    let mut unwatched = HeapApp::start(binary);
    let (_daemon, daemon) = start_heap_daemon(watched.proc.pid(), "exact");
    let held = watched.command("big 2");
    unwatched.command("big 2");
    unwatched.command("bench 10000");
    expect_held(daemon, watched.proc.pid(), &held, |_| TASK);

    let (w, u) = (watched.proc.pid(), unwatched.proc.pid());
    // Task hooks live in the executable, heap hooks in libc's malloc family: both are
    // patched in the watched process's copy only.
    assert!(
        patched_kb(w, "heap-app") > 0,
        "the watched executable shows no patched page"
    );
    assert!(
        patched_kb(w, "libc.so") > 0,
        "the watched process's libc shows no patched page"
    );
    assert_eq!(
        patched_kb(u, "heap-app"),
        0,
        "the unwatched executable was patched"
    );
    assert_eq!(
        patched_kb(u, "libc.so"),
        0,
        "the unwatched process's libc was patched"
    );
    let reported = scrape(daemon)
        .iter()
        .filter(|s| s.labels.get("pid") == Some(&u.to_string()))
        .count();
    assert_eq!(reported, 0, "series reported for the unwatched process");
}

/// `--heap sampled` tracks 1 block in 16 (by address) and scales: the estimate of a large
/// population of blocks lands near the truth.
#[test]
fn sampled_mode_estimates_live_bytes() {
    if !ebpf_available("sampled_mode_estimates_live_bytes") {
        return;
    }
    let mut app = HeapApp::start(workspace_root().join("target/release/heap-app"));
    let pid = app.proc.pid();
    let (_daemon, daemon) = start_heap_daemon(pid, "sampled");
    let held = app.command("aligned 2048")["heap_app::aligned_blocks"];
    // 2048 blocks sampled at 1/16: about 128 tracked, a standard deviation of about 8 %.
    eventually("sampled estimate within 40 %", DEADLINE, || {
        let got = site_bytes(&live_bytes(daemon, pid), "heap_app::aligned_blocks");
        ((got - held).abs() <= 0.4 * held)
            .then_some(())
            .ok_or(format!("fixture holds {held}, estimate {got}"))
    });
    app.command("release");
    eventually("released blocks leave the estimate", DEADLINE, || {
        let got = site_bytes(&live_bytes(daemon, pid), "heap_app::aligned_blocks");
        (got == 0.0).then_some(()).ok_or(format!("estimate {got}"))
    });
}

/// 1-based number of the first line containing `needle` after `async fn {function}(` in the
/// axum fixture's source, so the test follows edits of the fixture.
fn axum_fixture_line(function: &str, needle: &str) -> usize {
    let path = workspace_root().join("monitor/tests/fixtures/axum-app/src/main.rs");
    let src = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let start = src
        .lines()
        .position(|l| l.contains(&format!("async fn {function}(")))
        .unwrap_or_else(|| panic!("no async fn {function} in {}", path.display()));
    let offset = src
        .lines()
        .skip(start)
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} after async fn {function}"));
    start + offset + 1
}

/// With DWARF line info (the fixture built with `debug = "line-tables-only"`), a heap
/// callsite carries the `file:line` of the allocating call: the state leak's 256 KiB blocks
/// sit on the `vec!` line of the task, although the allocator call there is inlined library
/// code (`RawVec` down to `__rust_alloc`) whose own line-table row is in `alloc.rs`.
#[test]
fn heap_callsites_of_a_dwarf_build_carry_their_source_line() {
    if !ebpf_available("heap_callsites_of_a_dwarf_build_carry_their_source_line") {
        return;
    }
    let binary = workspace_root().join("target/fixtures-dwarf/release/axum-app");
    assert!(
        binary.exists(),
        "{} is missing: build fixtures first with `cargo xtask fixtures`",
        binary.display()
    );
    let (app, addr) = start_fixture(&binary, &[]);
    let pid = app.pid();
    let (_daemon, daemon) = start_heap_daemon(pid, "exact");
    const REQUESTS: usize = 10;
    for _ in 0..REQUESTS {
        get_ok(addr, "/state/leak");
    }
    let pushed = (REQUESTS * 256 * 1024) as f64;
    let leak = "axum_app::state_leak::{{closure}}::{{closure}}";
    let line = axum_fixture_line("state_leak", "let payload = vec![0x5au8; 256 * 1024];");
    let location = format!("monitor/tests/fixtures/axum-app/src/main.rs:{line}");
    eventually(
        "the leak's callsite holds its blocks at their line",
        DEADLINE,
        || {
            let series: Vec<_> = scrape(daemon)
                .into_iter()
                .filter(|s| {
                    s.name == "leakscope_heap_live_bytes"
                        && s.labels.get("pid") == Some(&pid.to_string())
                        && s.labels.get("site").map(String::as_str) == Some(leak)
                })
                .collect();
            series
                .iter()
                .any(|s| {
                    s.value >= pushed
                        && s.labels
                            .get("location")
                            .is_some_and(|l| l.ends_with(&location))
                })
                .then_some(())
                .ok_or(format!(
                    "no {leak} series holding {pushed} bytes at {location}: {:?}",
                    series
                        .iter()
                        .map(|s| (s.labels.get("location"), &s.labels["task_site"], s.value))
                        .collect::<Vec<_>>()
                ))
        },
    );
}

/// `--heap-max-blocks` bounds the kernel's outstanding-block map: beyond it, allocations are
/// counted as untracked (not lost silently), and the map's kernel memory shrinks with it.
#[test]
fn heap_max_blocks_bounds_tracking_and_counts_the_overflow() {
    if !ebpf_available("heap_max_blocks_bounds_tracking_and_counts_the_overflow") {
        return;
    }
    let mut app = HeapApp::start(workspace_root().join("target/release/heap-app"));
    let pid = app.proc.pid();
    let (bounded, daemon) = start_heap_daemon_with(pid, "exact", &["--heap-max-blocks", "1024"]);
    let held = app.command("aligned 2048")["heap_app::aligned_blocks"];
    assert_eq!(held, 2048.0 * 4096.0);
    let (tracked, dropped) = eventually("2048 blocks tracked or counted", DEADLINE, || {
        let samples = scrape(daemon);
        let tracked = site_value(
            &samples,
            "leakscope_heap_live_allocations",
            pid,
            "heap_app::aligned_blocks",
        );
        let dropped = samples
            .iter()
            .find(|s| {
                s.name == "leakscope_heap_untracked_allocations_total"
                    && s.labels.get("reason").map(String::as_str) == Some("outstanding_full")
            })
            .map_or(0.0, |s| s.value);
        (tracked + dropped >= 2048.0)
            .then_some((tracked, dropped))
            .ok_or(format!("tracked {tracked}, counted as dropped {dropped}"))
    });
    assert!(
        tracked <= 1024.0,
        "tracked {tracked} blocks in a 1024-block map"
    );
    assert!(dropped >= 1024.0, "only {dropped} counted as dropped");

    // The default map is 256 times larger; the bounded one saves its kernel memory.
    let (default_daemon, _) = start_heap_daemon(pid, "exact");
    let saved =
        bpf_map_memlock(default_daemon.pid()) as f64 - bpf_map_memlock(bounded.pid()) as f64;
    assert!(saved > 20e6, "a 1024-block map saved only {saved} bytes");
}

/// Without heap tracking, the heap maps are created at their smallest: a task-only daemon
/// does not pin the tens of MiB heap tracking needs.
#[test]
fn heap_off_keeps_the_heap_maps_small() {
    if !ebpf_available("heap_off_keeps_the_heap_maps_small") {
        return;
    }
    let app = HeapApp::start(workspace_root().join("target/release/heap-app"));
    let pid = app.proc.pid();
    let (off, _) = start_heap_daemon(pid, "off");
    let (exact, _) = start_heap_daemon(pid, "exact");
    let (off, exact) = (bpf_map_memlock(off.pid()), bpf_map_memlock(exact.pid()));
    assert!(off > 0, "no BPF maps found for the heap-off daemon");
    assert!(
        exact > off + 50_000_000,
        "heap off holds {off} bytes of maps, exact {exact}"
    );
}

/// A leaked task's own allocation (its cell: the future's state) is named after the task,
/// not after tokio's `Cell::new`: one live cell per leaked task, none for tasks that ended.
#[test]
fn leaked_tasks_cells_are_named_by_their_spawn_site() {
    if !ebpf_available("leaked_tasks_cells_are_named_by_their_spawn_site") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let (_daemon, daemon) = start_heap_daemon(pid, "exact");
    const REQUESTS: usize = 15;
    for _ in 0..REQUESTS {
        get_ok(addr, "/leak/forever");
        get_ok(addr, "/ok/awaited");
    }
    let cells = |handler: &str| {
        let site = format!("task cell: axum_app::{handler}::{{{{closure}}}}::{{{{closure}}}}");
        site_value(
            &scrape(daemon),
            "leakscope_heap_live_allocations",
            pid,
            &site,
        )
    };
    eventually(
        "one live cell per leaked task, none for the awaited ones",
        DEADLINE,
        || {
            let got = (cells("leak_forever"), cells("ok_awaited"));
            (got == (REQUESTS as f64, 0.0))
                .then_some(())
                .ok_or(format!("(leak_forever, ok_awaited) cells {got:?}"))
        },
    );
}

/// `--probe-stats` exports how often each of leakscope's BPF programs ran and for how long:
/// a loop of N allocate+free pairs shows at least N more runs of the allocation entry, the
/// return and the free programs, and time spent in them.
#[test]
fn probe_stats_count_every_hook_run() {
    if !ebpf_available("probe_stats_count_every_hook_run") {
        return;
    }
    let mut app = HeapApp::start(workspace_root().join("target/release/heap-app"));
    let pid = app.proc.pid();
    let (_daemon, daemon) = start_heap_daemon_with(pid, "exact", &["--probe-stats"]);
    const PROGRAMS: [&str; 3] = ["heap_alloc_entry", "heap_alloc_return", "heap_free_entry"];
    let read = |family: &str| -> Vec<f64> {
        let samples = scrape(daemon);
        PROGRAMS
            .iter()
            .map(|program| {
                samples
                    .iter()
                    .filter(|s| {
                        s.name == family
                            && s.labels.get("program").map(String::as_str) == Some(*program)
                    })
                    .map(|s| s.value)
                    .sum()
            })
            .collect()
    };
    let before = read("leakscope_probe_runs_total");
    const PAIRS: f64 = 1000.0;
    app.command(&format!("bench {PAIRS}"));
    eventually("every hook's runs counted", DEADLINE, || {
        let after = read("leakscope_probe_runs_total");
        let grown: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        grown
            .iter()
            .all(|&g| g >= PAIRS)
            .then_some(())
            .ok_or(format!("runs grew by {grown:?} for {PROGRAMS:?}"))
    });
    let seconds = read("leakscope_probe_run_seconds_total");
    assert!(
        seconds.iter().all(|&s| s > 0.0),
        "{seconds:?} for {PROGRAMS:?}"
    );
}

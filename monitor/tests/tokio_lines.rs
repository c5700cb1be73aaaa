//! Task truth on older tokio lines: the tokio-lines fixture (one source, built against
//! tokio =1.8.0, =1.10.0, =1.18.0, =1.22.0, =1.25.0, =1.28.0, =1.32.0 and =1.43.0 by
//! `cargo xtask fixtures`) spawns known
//! numbers of leaking and finishing tasks on a multi-thread and a current-thread runtime
//! and through `spawn_blocking`; leakscope must count each spawn site exactly on every
//! line, whose task vtable, header and trailer layouts all differ. On 1.10.0 it must also
//! show tokio's own published leak (tokio#4063: every `spawn_blocking` task cell is never
//! freed) as live heap at that spawn site, which 1.28.0 frees. On the lines whose runtime
//! keeps one owned-task list (1.25, 1.28, 1.32), the task census must count the tasks
//! leaked before leakscope attached.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// The fixture process, driven by its stdin commands.
struct Lines {
    app: Proc,
    krate: String,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Lines {
    /// Starts the fixture built against tokio `line` (`1-10-0`, ...).
    fn start(line: &str) -> Self {
        Self::start_binary(line, &fixture(&format!("tokio-lines-{line}")))
    }

    /// Starts `binary`, a build of the fixture against tokio `line`.
    fn start_binary(line: &str, binary: &std::path::Path) -> Self {
        let mut child = Command::new(binary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let binary = binary.to_path_buf();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready", "{}", binary.display());
        Self {
            app: Proc {
                child,
                name: binary.display().to_string(),
            },
            krate: format!("tokio_lines_{}", line.replace('-', "_")),
            stdin,
            stdout,
        }
    }

    /// Sends `command` and returns its `ok ...` answer.
    fn command(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ok "), "after {command}: {line:?}");
        line
    }

    /// The spawn-site label of the fixture's function `name`.
    fn site(&self, name: &str) -> String {
        format!("{}::{name}::{{{{closure}}}}", self.krate)
    }
}

const LEAK_MULTI: u64 = 5;
const FINISH_MULTI: u64 = 7;
const LEAK_CURRENT: u64 = 3;
const FINISH_CURRENT: u64 = 4;
const BLOCKING: u64 = 6;

/// Attaches to the fixture of `line`, drives every kind of spawn and checks each site's
/// exact counts. Returns the fixture and daemon for further checks.
fn exact_counts(line: &str, daemon_args: &[&str]) -> Option<(Lines, Proc, SocketAddr)> {
    if !ebpf_available(&format!("tokio {line}")) {
        return None;
    }
    let mut app = Lines::start(line);
    let pid = app.app.pid();
    let (daemon, addr) = watch(pid, daemon_args);
    app.command(&format!("leak-multi {LEAK_MULTI}"));
    app.command(&format!("finish-multi {FINISH_MULTI}"));
    app.command(&format!("leak-current {LEAK_CURRENT}"));
    app.command(&format!("finish-current {FINISH_CURRENT}"));
    let last = app.command(&format!("blocking {BLOCKING}"));
    assert_eq!(
        last.trim(),
        format!(
            "ok leak-multi={LEAK_MULTI} finish-multi={FINISH_MULTI} leak-current={LEAK_CURRENT} \
             finish-current={FINISH_CURRENT} blocking={BLOCKING}"
        )
    );
    let n = |v: u64| v as f64;
    let leaks = [("leaky_multi", LEAK_MULTI), ("leaky_current", LEAK_CURRENT)];
    for (name, count) in leaks {
        expect_site(addr, pid, &app.site(name), (n(count), 0.0, n(count)));
    }
    let finished = [
        ("finished_multi", FINISH_MULTI),
        ("finished_current", FINISH_CURRENT),
        ("spawn_blocking_work", BLOCKING),
    ];
    for (name, count) in finished {
        expect_site(addr, pid, &app.site(name), (n(count), n(count), 0.0));
    }
    Some((app, daemon, addr))
}

#[test]
fn tokio_1_8_counts_every_site_exactly() {
    exact_counts("1-8-0", &[]);
}

#[test]
fn tokio_1_22_counts_every_site_exactly() {
    exact_counts("1-22-0", &[]);
}

#[test]
fn tokio_1_32_counts_every_site_exactly() {
    exact_counts("1-32-0", &[]);
}

#[test]
fn tokio_1_43_counts_every_site_exactly() {
    exact_counts("1-43-0", &[]);
}

#[test]
fn tokio_1_18_counts_every_site_exactly() {
    exact_counts("1-18-0", &[]);
}

#[test]
fn tokio_1_25_counts_every_site_exactly() {
    exact_counts("1-25-0", &[]);
}

/// The task census on a line whose runtime keeps one owned-task list (tokio 1.23–1.34,
/// before `ShardedList`): tasks leaked (and others finished) on the `flavor` runtime
/// (`multi` or `current`) before leakscope attaches are counted alive at their site within
/// one census interval, and a task leaked after attach is added once, by the hooks.
fn census_before_attach(line: &str, flavor: &str) {
    if !ebpf_available(&format!("census on tokio {line} {flavor}")) {
        return;
    }
    const LEAKED: u64 = 9;
    let mut app = Lines::start(line);
    let pid = app.app.pid();
    app.command(&format!("leak-{flavor} {LEAKED}"));
    app.command(&format!("finish-{flavor} 4"));
    let (_daemon, addr) = watch(pid, &[]);
    let site = app.site(&format!("leaky_{flavor}"));
    let n = LEAKED as f64;
    expect_alive(addr, pid, &site, (n, n), CENSUS_INTERVAL);
    let samples = scrape(addr);
    let of_pid = |family: &str| sum(&samples, family, &[("pid", &pid.to_string())]);
    assert_eq!(of_pid("leakscope_census_runtimes"), 1.0);
    assert_eq!(of_pid("leakscope_census_not_found_total"), 0.0);
    assert_eq!(
        of_pid("leakscope_tasks_alive"),
        n,
        "only the leaked tasks are alive: the finished ones left the list"
    );
    app.command(&format!("leak-{flavor} 1"));
    expect_alive(addr, pid, &site, (n + 1.0, n), DEADLINE);
}

#[test]
fn tokio_1_25_census_counts_tasks_leaked_before_attach() {
    census_before_attach("1-25-0", "multi");
}

#[test]
fn tokio_1_25_census_counts_tasks_leaked_before_attach_current_thread() {
    census_before_attach("1-25-0", "current");
}

#[test]
fn tokio_1_28_census_counts_tasks_leaked_before_attach() {
    census_before_attach("1-28-0", "multi");
}

#[test]
fn tokio_1_32_census_counts_tasks_leaked_before_attach() {
    census_before_attach("1-32-0", "multi");
}

#[test]
fn tokio_1_32_census_counts_tasks_leaked_before_attach_current_thread() {
    census_before_attach("1-32-0", "current");
}

/// Live heap (bytes, allocations) of `pid` in the cells of tasks spawned at `site`.
fn cells(addr: SocketAddr, pid: u32, site: &str) -> (f64, f64) {
    let samples = scrape(addr);
    let of = |family: &str| {
        sum(
            &samples,
            family,
            &[
                ("pid", &pid.to_string()),
                ("site", &format!("task cell: {site}")),
            ],
        )
    };
    (
        of("leakscope_heap_live_bytes"),
        of("leakscope_heap_live_allocations"),
    )
}

/// tokio 1.10.0's `spawn_blocking` leaks every task cell once the task has run: the tasks
/// complete, their cells stay allocated, and leakscope shows them as live heap at the
/// blocking spawn site.
#[test]
fn tokio_1_10_0_blocking_cells_leak_as_published() {
    let Some((app, _daemon, addr)) = exact_counts("1-10-0", &["--heap", "exact"]) else {
        return;
    };
    let pid = app.app.pid();
    let site = app.site("spawn_blocking_work");
    eventually(
        &format!("the {BLOCKING} leaked task cells of {site} are live heap"),
        DEADLINE,
        || {
            let (bytes, blocks) = cells(addr, pid, &site);
            // One block per task, each at least its header (6 words on this line).
            (blocks == BLOCKING as f64 && bytes >= (BLOCKING * 48) as f64)
                .then_some(())
                .ok_or(format!(
                    "{blocks} cells, {bytes} bytes live: {:?}",
                    live_bytes(addr, pid)
                ))
        },
    );
}

/// The same program on 1.28.0, where the leak is fixed: the blocking tasks' cells are freed.
#[test]
fn tokio_1_28_counts_every_site_exactly_and_frees_blocking_cells() {
    let Some((app, _daemon, addr)) = exact_counts("1-28-0", &["--heap", "exact"]) else {
        return;
    };
    let pid = app.app.pid();
    let site = app.site("spawn_blocking_work");
    let leaky = app.site("leaky_multi");
    // The leaking tasks' cells are live heap (so the heap is being read), the blocking
    // ones' are not.
    eventually(
        "leaked task cells live, blocking ones freed",
        DEADLINE,
        || {
            let (_, leaked) = cells(addr, pid, &leaky);
            let (blocking, _) = cells(addr, pid, &site);
            (leaked == LEAK_MULTI as f64 && blocking == 0.0)
                .then_some(())
                .ok_or(format!(
                    "{leaked} cells at {leaky}, {blocking} bytes at {site}"
                ))
        },
    );
}

/// A tokio binary whose tasks cannot be read (the 1.10.0 build stripped: its vtables carry
/// no offsets, so nothing finds them without symbols) still has its heap tracked, every
/// allocation under `task_site="unknown (tasks not read)"`, and no task figures are made
/// up for it; `inspect` says what could not be learned.
#[test]
fn a_binary_whose_tasks_cannot_be_read_still_gets_heap_tracking() {
    let binary = fixture("tokio-lines-1-10-0-stripped");
    let inspect = Command::new(env!("CARGO_BIN_EXE_leakscope"))
        .arg("inspect")
        .arg(&binary)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{said}");
    assert!(
        said.contains("tasks:       NOT READ")
            && said.contains("no task vtables found")
            && said.contains("task counts and spawn sites are not available"),
        "{said}"
    );
    if !ebpf_available("heap without tasks") {
        return;
    }
    let mut app = Lines::start_binary("1-10-0", &binary);
    let pid = app.app.pid();
    let (_daemon, addr) = watch(pid, &["--heap", "exact"]);
    app.command(&format!("leak-multi {LEAK_MULTI}"));
    app.command(&format!("blocking {BLOCKING}"));
    eventually("heap tracked, every task site unknown", DEADLINE, || {
        let live = live_bytes(addr, pid);
        let bytes: f64 = live.values().sum();
        let sites: Vec<&String> = live.keys().map(|(_, task_site)| task_site).collect();
        (bytes > 0.0 && sites.iter().all(|s| *s == "unknown (tasks not read)"))
            .then_some(())
            .ok_or(format!("{live:?}"))
    });
    let samples = scrape(addr);
    let task_series = samples
        .iter()
        .filter(|s| {
            s.name.starts_with("leakscope_tasks_")
                && s.labels.contains_key("site")
                && s.labels.get("pid") == Some(&pid.to_string())
        })
        .count();
    assert_eq!(
        task_series, 0,
        "no task figures for a binary whose tasks are not read"
    );
}

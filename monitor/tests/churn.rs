//! Two daemons on two processes of one executable: while the first is killed (its uprobes on
//! that file torn down by the kernel), the second attaches to the same offsets in the same
//! file. The survivor must count every spawn. An earlier session saw new probes stay silent
//! under such churn; 60 rounds by hand did not reproduce it, and this keeps checking.

mod support;

use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(30);
const ROUNDS: usize = 4;
const REQUESTS: usize = 5;
const KILL_STEP_MS: u64 = 300;

#[test]
fn a_daemon_killed_while_another_attaches_leaves_the_others_probes_working() {
    if !ebpf_available("a_daemon_killed_while_another_attaches_leaves_the_others_probes_working") {
        return;
    }
    let binary = fixture("axum-app");
    let site = "axum_app::ok_awaited::{{closure}}::{{closure}}";
    for round in 0..ROUNDS {
        let (first_app, _) = start_fixture(&binary, &[]);
        let (first, first_listen) = start_daemon(&["--pid".into(), first_app.pid().to_string()]);
        wait_attached(first_listen, first_app.pid());

        let (app, addr) = start_fixture(&binary, &[]);
        let pid = app.pid();
        // The second daemon takes about a second to analyse, load and attach; the first is
        // killed at a different point of that in each round, and the kernel tears its
        // probes down meanwhile.
        let delay = Duration::from_millis(KILL_STEP_MS * round as u64);
        let killer = std::thread::spawn(move || {
            let mut first = first;
            std::thread::sleep(delay);
            first.child.kill().expect("killing the first daemon");
            first
        });
        let (_daemon, daemon) = start_daemon(&["--pid".into(), pid.to_string()]);
        wait_attached(daemon, pid);
        drop(killer.join().expect("the killer thread"));
        for _ in 0..REQUESTS {
            get_ok(addr, "/ok/awaited");
        }
        eventually(
            &format!("round {round}: {REQUESTS} spawns counted by the surviving daemon"),
            DEADLINE,
            || {
                let spawned =
                    site_value(&scrape(daemon), "leakscope_tasks_spawned_total", pid, site);
                (spawned == REQUESTS as f64)
                    .then_some(())
                    .ok_or(format!("spawned {spawned}"))
            },
        );
    }
}

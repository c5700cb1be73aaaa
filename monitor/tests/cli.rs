//! Bad input gets a clear, actionable error, and `inspect` names the fixture's sites.

mod support;

use std::process::{Command, Output};

use support::*;

fn leakscope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leakscope"))
        .args(args)
        .output()
        .expect("running leakscope")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn inspect_names_every_handler_site_and_its_method() {
    for (binary, krate) in [("axum-app", "axum_app"), ("axum-app-lts", "axum_app_lts")] {
        let path = fixture(binary);
        let out = leakscope(&["inspect", path.to_str().unwrap()]);
        assert!(out.status.success(), "inspect {binary}: {}", stderr(&out));
        let table = String::from_utf8_lossy(&out.stdout);
        for handler in [
            "leak_forever",
            "leak_stream",
            "ok_bounded",
            "ok_awaited",
            "ok_aborted",
            "ok_stream",
            "state_leak",
        ] {
            let site = format!("{krate}::{handler}::{{{{closure}}}}::{{{{closure}}}}");
            let line = table
                .lines()
                .find(|l| l.ends_with(&site))
                .unwrap_or_else(|| panic!("{binary}: no site {site} in:\n{table}"));
            // Futures whose poll fn was inlined into tokio's are named from the task cell type.
            assert!(
                line.contains("future poll fn") || line.contains("task cell type"),
                "{binary}: {line}"
            );
            if handler.starts_with("leak") {
                assert!(line.contains("future poll fn"), "{binary}: {line}");
            }
            assert!(
                line.contains("hooked"),
                "{binary}: completion not hooked: {line}"
            );
        }
        assert!(
            table.contains("bind_inner"),
            "{binary}: no spawn hook:\n{table}"
        );
        assert!(
            table.contains("spawn_task"),
            "{binary}: no spawn_blocking hook:\n{table}"
        );
    }
}

#[test]
fn inspect_json_is_machine_readable() {
    let path = fixture("axum-app");
    let out = leakscope(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let vtables = json["vtables"].as_array().expect("vtables array");
    assert!(
        vtables
            .iter()
            .any(|v| v["site"] == "axum_app::leak_forever::{{closure}}::{{closure}}"),
        "{json:#}"
    );
}

#[test]
fn inspect_of_a_stripped_copy_still_finds_the_vtables() {
    let full = leakscope(&["inspect", "--json", fixture("axum-app").to_str().unwrap()]);
    let stripped = leakscope(&[
        "inspect",
        "--json",
        fixture("axum-app-stripped").to_str().unwrap(),
    ]);
    assert!(stripped.status.success(), "{}", stderr(&stripped));
    let count = |o: &Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["vtables"].as_array().unwrap().len()
    };
    assert_eq!(count(&stripped), count(&full));
    assert!(String::from_utf8_lossy(&stripped.stdout).contains("vtable@0x"));
}

#[test]
fn not_a_tokio_binary_says_so() {
    let out = leakscope(&["inspect", "/bin/true"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not look like a tokio binary"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_file_and_non_elf_are_clear_errors() {
    let out = leakscope(&["inspect", "/nonexistent/app"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/app"),
        "{}",
        stderr(&out)
    );
    let manifest = workspace_root().join("Cargo.toml");
    let out = leakscope(&["inspect", manifest.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).to_lowercase().contains("elf"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn daemon_with_a_missing_pid_fails_clearly() {
    let out = leakscope(&["daemon", "--pid", "4194303", "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no process with pid 4194303"), "{err}");
}

#[test]
fn daemon_on_a_process_that_is_not_tokio_says_so() {
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("starting sleep");
    let out = leakscope(&[
        "daemon",
        "--pid",
        &sleeper.id().to_string(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not look like a tokio binary"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn daemon_on_an_executable_that_is_not_tokio_says_so_before_loading_anything() {
    // Checked before any probe is loaded, so it needs no privileges to explain.
    let out = leakscope(&["daemon", "--exe", "/bin/true", "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--exe /bin/true") && err.contains("does not look like a tokio binary"),
        "{err}"
    );
}

#[test]
fn report_without_targets_fails_clearly() {
    // (`daemon` without targets watches the host instead: see tests/host.rs.)
    let out = leakscope(&["report", "--duration", "1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing to watch"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn inspect_reports_first_poll_hooks_where_bind_inner_was_inlined() {
    let out = leakscope(&["inspect", fixture("one-task-type").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().any(|l| l.contains("first poll")
            && l.contains("one_task_type::main::{{closure}}::{{closure}}::{{closure}}")),
        "{table}"
    );
}

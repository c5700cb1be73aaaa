//! `leakscope top` as a person uses it, in a real terminal (tmux): against a daemon watching
//! the axum fixture under leaky and bounded traffic, the leaking handler shows up as a
//! suspect row, a filter typed after `/` hides the other rows, and `q` quits.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::*;

const LEAK: &str = "axum_app::leak_forever";
const OK: &str = "axum_app::ok_bounded";

/// A detached tmux session on a server of its own (its own socket, no config file), killed
/// when dropped.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn start(command: &str) -> Self {
        let name = format!("leakscope-top-{}", std::process::id());
        let tmux = Self {
            socket: name.clone(),
            session: name,
        };
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            &tmux.session,
            "-x",
            "200",
            "-y",
            "50",
            command,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-f", "/dev/null", "-L", &self.socket])
            .args(args)
            .output()
            .expect("running tmux (install it: apt-get install tmux)")
    }

    /// The screen as text.
    fn screen(&self) -> Result<String, String> {
        let out = self.run(&["capture-pane", "-p", "-t", &self.session]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "capture-pane: {} (did top exit?)",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn send_keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend(keys);
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "tmux send-keys {keys:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", &self.session])
            .status
            .success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-session", "-t", &self.session]);
        let _ = self.run(&["kill-server"]);
    }
}

/// Waits until `check` holds for the screen; fails with the last screen.
fn wait_for_screen(tmux: &Tmux, what: &str, check: impl Fn(&str) -> bool) -> String {
    eventually(what, Duration::from_secs(60), || {
        let screen = tmux.screen()?;
        if check(&screen) {
            Ok(screen)
        } else {
            Err(format!("the screen is:\n{screen}"))
        }
    })
}

#[test]
fn top_shows_the_leak_as_a_suspect_filters_and_quits() {
    if !ebpf_available("top") {
        return;
    }
    let (app, addr) = start_fixture(&fixture("axum-app"), &[]);
    let pid = app.pid();
    let (_daemon, daemon) = watch_verdicts(pid, "10", "1", false);
    let _traffic = Traffic::start(addr, &["/leak/forever", "/ok/bounded"], &[]);

    let tmux = Tmux::start(&format!(
        "{} top --api {daemon}",
        env!("CARGO_BIN_EXE_leakscope")
    ));
    let screen = wait_for_screen(&tmux, "the leak is a suspect row", |screen| {
        screen
            .lines()
            .any(|l| l.contains(LEAK) && l.contains("SUSPECT"))
            && screen.contains(OK)
    });
    assert!(
        screen.contains(&format!("top · {daemon} · ")),
        "the header names the daemon:\n{screen}"
    );

    tmux.send_keys(&["/"]);
    tmux.send_keys(&["-l", "leak_forever"]);
    tmux.send_keys(&["Enter"]);
    wait_for_screen(&tmux, "the filter hides the bounded handler", |screen| {
        !screen.contains(OK)
            && screen.contains("matching \"leak_forever\"")
            && screen
                .lines()
                .any(|l| l.contains(LEAK) && l.contains("SUSPECT"))
    });

    tmux.send_keys(&["q"]);
    eventually("top exits on q", Duration::from_secs(10), || {
        if tmux.alive() {
            Err(format!(
                "still running; the screen is:\n{:?}",
                tmux.screen()
            ))
        } else {
            Ok(())
        }
    });
}

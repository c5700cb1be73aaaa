//! `leakscope report`: one session for a fixed time, sampled for verdicts, with a progress
//! indicator on stderr; the verdicts at the end are the report.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::bail;
use leakscope_api::types::{Verdict, VerdictsResponse};

use super::DaemonConfig;
use super::session::Session;

/// Watches the targets of `config` for `duration` seconds and returns every site's verdict.
pub async fn watch(config: &DaemonConfig, duration: f64) -> anyhow::Result<VerdictsResponse> {
    let mut session = Session::start(config).await?;
    let period = Duration::from_secs_f64(config.analysis.period);
    let end = Instant::now() + Duration::from_secs_f64(duration);
    let mut progress = Progress::new(duration);
    let mut sample = tokio::time::interval(period);
    let mut rescan = tokio::time::interval(config.rescan);
    loop {
        tokio::select! {
            _ = sample.tick() => {
                session.sample();
                let analysis = session.analysis().lock().unwrap_or_else(|e| e.into_inner());
                let verdicts = analysis.verdicts();
                let suspects = verdicts.iter().filter(|v| v.verdict == Verdict::Suspect).count();
                progress.show(verdicts.len(), suspects);
            }
            followed = session.follow_processes(&mut rescan) => {
                if let Err(reason) = followed {
                    bail!("the event stream stopped: {reason}");
                }
            }
            _ = tokio::time::sleep_until(end.into()) => break,
        }
    }
    session.sample();
    progress.finish();
    if session.attached() == 0 {
        bail!("no target process is attached any more (they exited): nothing to report");
    }
    let verdicts = session
        .analysis()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .sites();
    session.shutdown();
    Ok(verdicts)
}

/// A progress bar on a terminal; a line every 10 s otherwise (logs, CI).
struct Progress {
    started: Instant,
    duration: f64,
    tty: bool,
    last_line: f64,
}

impl Progress {
    fn new(duration: f64) -> Self {
        Self {
            started: Instant::now(),
            duration,
            tty: std::io::stderr().is_terminal(),
            last_line: f64::NEG_INFINITY,
        }
    }

    fn show(&mut self, sites: usize, suspects: usize) {
        let elapsed = self.started.elapsed().as_secs_f64().min(self.duration);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let filled = ((elapsed / self.duration) * 30.0) as usize;
            let _ = write!(
                err,
                "\r[{}{}] {elapsed:.0}/{:.0} s  {sites} sites, {suspects} suspects ",
                "#".repeat(filled),
                "-".repeat(30 - filled.min(30)),
                self.duration
            );
            let _ = err.flush();
        } else if elapsed - self.last_line >= 10.0 {
            self.last_line = elapsed;
            let _ = writeln!(
                err,
                "leakscope: watching, {elapsed:.0}/{:.0} s: {sites} sites, {suspects} suspects",
                self.duration
            );
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

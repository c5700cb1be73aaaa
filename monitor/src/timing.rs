//! Where the time of slow one-off work goes (analysing a binary, loading the probes,
//! attaching a process): one debug line per piece of work, with its phases, under a target
//! of its own so that `RUST_LOG=info,leakscope::timing=debug` shows them without the rest
//! of the debug log. `cargo xtask bench --attach` reads these lines for its breakdown.

use std::time::{Duration, Instant};

/// The log target of the timing lines.
pub const TARGET: &str = "leakscope::timing";

/// The phases of one piece of work, logged by [`Phases::finish`] as
/// `WHAT: TOTAL ms = PHASE MS + PHASE MS …`.
#[derive(Debug)]
pub struct Phases {
    what: String,
    started: Instant,
    lap_started: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Phases {
    pub fn start(what: impl Into<String>) -> Self {
        let now = Instant::now();
        Self {
            what: what.into(),
            started: now,
            lap_started: now,
            laps: Vec::new(),
        }
    }

    /// Ends the phase `name`, which ran since the start or the previous lap.
    pub fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, now - self.lap_started));
        self.lap_started = now;
    }

    /// The line [`Phases::finish`] logs.
    pub fn line(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let laps: Vec<String> = self
            .laps
            .iter()
            .map(|(name, d)| format!("{name} {:.1}", ms(*d)))
            .collect();
        format!(
            "{}: {:.1} ms = {}",
            self.what,
            ms(self.started.elapsed()),
            laps.join(" + ")
        )
    }

    /// Logs the phases at debug level under [`TARGET`].
    pub fn finish(self) {
        if log::log_enabled!(target: TARGET, log::Level::Debug) {
            log::debug!(target: TARGET, "{}", self.line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Phases;

    #[test]
    fn line_names_each_phase_in_order() {
        let mut p = Phases::start("analysis of x");
        p.lap("load");
        p.lap("vtables");
        let line = p.line();
        assert!(line.starts_with("analysis of x: "), "{line}");
        let phases = line.split_once(" ms = ").unwrap().1;
        let names: Vec<&str> = phases
            .split(" + ")
            .map(|p| p.split_once(' ').unwrap().0)
            .collect();
        assert_eq!(names, ["load", "vtables"]);
    }
}

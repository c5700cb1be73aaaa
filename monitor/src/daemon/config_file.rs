//! The daemon's config file (`leakscope daemon --config FILE`): every setting of the
//! command line, in TOML, so a systemd unit or a DaemonSet can keep them in one place. A
//! flag given on the command line wins over the file; the file wins over the defaults.
//!
//! ```toml
//! listen = "127.0.0.1:9464"
//! heap = "sampled"
//! web_config = "web.yml"   # TLS and basic auth; relative to this file
//!
//! [targets]
//! all = true
//! all_under = "/srv"
//!
//! [verdicts]
//! window_seconds = 300
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use super::heap::HeapMode;

#[derive(Debug, Error)]
pub enum ConfigError {
    // Not `source`: the cause is in this one line already, not repeated after it.
    #[error("cannot read the config file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}:{line}:{column}: {message} (see `leakscope daemon --help` for the settings)")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The file's settings; an absent one keeps the command line's value or default.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    /// The listener's web config (`--web-config`); a relative path is relative to this
    /// file, as a systemd unit or a ConfigMap keeps the two side by side.
    pub web_config: Option<PathBuf>,
    pub heap: Option<HeapMode>,
    pub probe_stats: Option<bool>,
    pub rescan_seconds: Option<f64>,
    #[serde(default)]
    pub targets: TargetsSection,
    #[serde(default)]
    pub verdicts: VerdictsSection,
    #[serde(default)]
    pub heap_windows: HeapWindowsSection,
}

/// `[heap_windows]`: when `heap = "adaptive"` opens its windows, and their bounds (the
/// `--heap-window-*`, `--heap-follow-seconds` and `--heap-growth-*` flags).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeapWindowsSection {
    pub window_seconds: Option<f64>,
    pub follow_seconds: Option<f64>,
    pub follow_quiet_seconds: Option<f64>,
    pub cooldown_seconds: Option<f64>,
    pub budget_seconds_per_10_minutes: Option<f64>,
    pub lookback_seconds: Option<f64>,
    pub min_growth_bytes: Option<u64>,
    pub min_windows: Option<usize>,
    pub windows_at_once: Option<usize>,
}

/// `[targets]`: which processes to watch.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsSection {
    pub pids: Option<Vec<u32>>,
    pub exes: Option<Vec<PathBuf>>,
    pub all: Option<bool>,
    pub all_under: Option<PathBuf>,
    pub include: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
    pub max_processes: Option<usize>,
    pub node_log_dir: Option<PathBuf>,
    pub heap_max_blocks: Option<u32>,
    pub census_seconds: Option<f64>,
    pub tasks: Option<crate::daemon::census::TaskMode>,
}

/// `[verdicts]`: the window, the sampling and the thresholds of the leak verdicts.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictsSection {
    pub window_seconds: Option<f64>,
    pub sample_seconds: Option<f64>,
    pub p_value: Option<f64>,
    pub min_tasks: Option<f64>,
    pub min_heap_bytes_per_second: Option<f64>,
    pub min_heap_growth_ratio: Option<f64>,
}

/// Reads and checks `path`; a mistake is one line naming the file, the line and column,
/// and what is wrong.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.display().to_string(),
        error,
    })?;
    let mut file = parse(path, &text)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    // `join` keeps an absolute path as it is.
    file.web_config = file.web_config.map(|web| dir.join(web));
    Ok(file)
}

/// Checks `text`, the contents of the file at `path` (named in errors).
pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    toml::from_str(text).map_err(|err: toml::de::Error| {
        let offset = err.span().map_or(0, |span| span.start).min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError::Invalid {
            path: path.display().to_string(),
            line,
            column,
            message: err.message().trim().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_section() {
        let file = parse(
            Path::new("leakscope.toml"),
            "listen = \"0.0.0.0:9464\"\nheap = \"sampled\"\n\n[targets]\nall = true\n\
             all_under = \"/srv\"\n\n[verdicts]\nwindow_seconds = 300\nmin_tasks = 10\n",
        )
        .unwrap();
        assert_eq!(file.listen, Some("0.0.0.0:9464".parse().unwrap()));
        assert_eq!(file.heap, Some(HeapMode::Sampled));
        assert_eq!(file.targets.all, Some(true));
        assert_eq!(file.targets.all_under, Some(PathBuf::from("/srv")));
        assert_eq!(file.verdicts.window_seconds, Some(300.0));
        assert_eq!(file.verdicts.min_tasks, Some(10.0));
        assert_eq!(file.targets.pids, None);
    }

    #[test]
    fn the_task_mode_is_read_beside_the_census_interval() {
        let file = parse(
            Path::new("leakscope.toml"),
            "[targets]\ncensus_seconds = 5.0\ntasks = \"census\"\n",
        )
        .unwrap();
        assert_eq!(
            file.targets.tasks,
            Some(crate::daemon::census::TaskMode::Census)
        );
        let err = parse(Path::new("c.toml"), "[targets]\ntasks = \"probes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `probes`"), "{err}");
    }

    #[test]
    fn adaptive_heap_and_its_windows_are_read_and_flags_win() {
        let file = parse(
            Path::new("leakscope.toml"),
            "heap = \"adaptive\"\n\n[heap_windows]\nwindow_seconds = 30\nfollow_seconds = 90\n\
             budget_seconds_per_10_minutes = 60\n",
        )
        .unwrap();
        assert_eq!(file.heap, Some(HeapMode::Adaptive));
        let mut config = crate::daemon::heap_window::HeapWindowConfig::default();
        // --heap-follow-seconds given on the command line: the file's 90 does not apply.
        config.overlay(&file.heap_windows, |id| id == "heap_follow_seconds");
        assert_eq!(config.window_seconds, 30.0);
        assert_eq!(
            config.follow_seconds,
            crate::daemon::heap_window::HeapWindowConfig::default().follow_seconds
        );
        assert_eq!(config.budget_seconds, 60.0);
        assert_eq!(config.min_windows, 2);
    }

    #[test]
    fn a_mistake_is_one_line_with_its_place() {
        let err = parse(
            Path::new("/etc/leakscope.toml"),
            "listen = \"127.0.0.1:9464\"\n\n[verdicts]\nwindow = 300\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("/etc/leakscope.toml:4:1: unknown field `window`"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        let err = parse(Path::new("c.toml"), "heap = \"always\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.toml:1:8: unknown variant `always`"),
            "{err}"
        );
    }

    #[test]
    fn a_relative_web_config_is_beside_the_file() {
        let dir =
            std::env::temp_dir().join(format!("leakscope-config-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("leakscope.toml");
        std::fs::write(&path, "web_config = \"web.yml\"\n").unwrap();
        assert_eq!(load(&path).unwrap().web_config, Some(dir.join("web.yml")));
        std::fs::write(&path, "web_config = \"/etc/web.yml\"\n").unwrap();
        assert_eq!(
            load(&path).unwrap().web_config,
            Some(PathBuf::from("/etc/web.yml"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

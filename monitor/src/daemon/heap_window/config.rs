//! `--heap adaptive`'s settings: flags, the config file's `[heap_windows]`, and their
//! bounds.

use std::time::Duration;

use crate::daemon::config_file::HeapWindowsSection;

/// The span `--heap-window-budget-seconds` is counted over.
pub const BUDGET_PERIOD: Duration = Duration::from_secs(600);

/// How `--heap adaptive` decides and bounds its windows (`leakscope daemon`'s flags).
#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
pub struct HeapWindowConfig {
    /// --heap adaptive: seconds every allocator hook stays on in a window (1–600).
    #[arg(
        id = "heap_window_seconds",
        long = "heap-window-seconds",
        default_value_t = 5.0
    )]
    pub window_seconds: f64,
    /// --heap adaptive: seconds a window's blocks are then followed with the free hook
    /// alone; what is still live after that counts as having survived (1–3600).
    #[arg(
        id = "heap_follow_seconds",
        long = "heap-follow-seconds",
        default_value_t = 10.0
    )]
    pub follow_seconds: f64,
    /// --heap adaptive: the follow phase ends early once no block of the window has been
    /// freed for this long: what is left has outlived the window's typical lifetimes (0:
    /// always follow for --heap-follow-seconds; 0–3600).
    #[arg(
        id = "heap_follow_quiet_seconds",
        long = "heap-follow-quiet-seconds",
        default_value_t = 2.0
    )]
    pub follow_quiet_seconds: f64,
    /// --heap adaptive: seconds with no heap probe after a window, before the next (0–86400).
    #[arg(
        id = "heap_window_cooldown_seconds",
        long = "heap-window-cooldown-seconds",
        default_value_t = 20.0
    )]
    pub cooldown_seconds: f64,
    /// --heap adaptive: seconds of heap probes (both phases) a process may get in any 10
    /// minutes (10–600). 30 s is 5 % of the time, held over 10 minutes rather than an hour
    /// so that no stretch an operator looks at pays more: with the default phases that is
    /// two windows, what a suspect needs.
    #[arg(
        id = "heap_window_budget_seconds",
        long = "heap-window-budget-seconds",
        default_value_t = 30.0
    )]
    pub budget_seconds: f64,
    /// --heap adaptive: seconds of anonymous-memory samples the growth test looks at
    /// (1–3600).
    #[arg(
        id = "heap_growth_lookback_seconds",
        long = "heap-growth-lookback-seconds",
        default_value_t = 30.0
    )]
    pub lookback_seconds: f64,
    /// --heap adaptive: bytes the anonymous memory must gain over the lookback, beyond what
    /// new tasks account for, to open a window (at least 64 KiB).
    #[arg(id = "heap_growth_min_bytes", long = "heap-growth-min-bytes", default_value_t = 1 << 20)]
    pub min_growth_bytes: u64,
    /// --heap adaptive: windows whose survivors at one callsite make it a suspect (1–16).
    #[arg(
        id = "heap_window_min_windows",
        long = "heap-window-min-windows",
        default_value_t = 2
    )]
    pub min_windows: usize,
    /// --heap adaptive: windows open at once across processes (1–64).
    #[arg(
        id = "heap_windows_at_once",
        long = "heap-windows-at-once",
        default_value_t = 4
    )]
    pub max_open: usize,
}

impl Default for HeapWindowConfig {
    fn default() -> Self {
        Self {
            window_seconds: 5.0,
            follow_seconds: 10.0,
            follow_quiet_seconds: 2.0,
            cooldown_seconds: 20.0,
            budget_seconds: 30.0,
            lookback_seconds: 30.0,
            min_growth_bytes: 1 << 20,
            min_windows: 2,
            max_open: 4,
        }
    }
}

impl HeapWindowConfig {
    /// The config file's `[heap_windows]` settings over these, except those whose flag
    /// `from_command_line` says was given.
    pub fn overlay(&mut self, file: &HeapWindowsSection, from_command_line: impl Fn(&str) -> bool) {
        macro_rules! take {
            ($id:literal, $field:expr, $value:expr) => {
                if !from_command_line($id)
                    && let Some(value) = $value
                {
                    $field = value;
                }
            };
        }
        take!(
            "heap_window_seconds",
            self.window_seconds,
            file.window_seconds
        );
        take!(
            "heap_follow_seconds",
            self.follow_seconds,
            file.follow_seconds
        );
        take!(
            "heap_follow_quiet_seconds",
            self.follow_quiet_seconds,
            file.follow_quiet_seconds
        );
        take!(
            "heap_window_cooldown_seconds",
            self.cooldown_seconds,
            file.cooldown_seconds
        );
        take!(
            "heap_window_budget_seconds",
            self.budget_seconds,
            file.budget_seconds_per_10_minutes
        );
        take!(
            "heap_growth_lookback_seconds",
            self.lookback_seconds,
            file.lookback_seconds
        );
        take!(
            "heap_growth_min_bytes",
            self.min_growth_bytes,
            file.min_growth_bytes
        );
        take!(
            "heap_window_min_windows",
            self.min_windows,
            file.min_windows
        );
        take!("heap_windows_at_once", self.max_open, file.windows_at_once);
    }

    /// Within the documented bounds.
    pub fn bounded(self) -> Self {
        Self {
            window_seconds: self.window_seconds.clamp(1.0, 600.0),
            follow_seconds: self.follow_seconds.clamp(1.0, 3600.0),
            follow_quiet_seconds: self.follow_quiet_seconds.clamp(0.0, 3600.0),
            cooldown_seconds: self.cooldown_seconds.clamp(0.0, 86400.0),
            budget_seconds: self.budget_seconds.clamp(10.0, BUDGET_PERIOD.as_secs_f64()),
            lookback_seconds: self.lookback_seconds.clamp(1.0, 3600.0),
            min_growth_bytes: self.min_growth_bytes.max(64 << 10),
            min_windows: self.min_windows.clamp(1, 16),
            max_open: self.max_open.clamp(1, 64),
        }
    }
}

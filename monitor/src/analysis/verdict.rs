//! The rules: from one site's samples to a verdict, its pattern, the reason in plain words
//! and the remedy. Pure functions of the samples and the thresholds, so each rule is tested
//! on synthetic series shaped like the leaks and non-leaks it must tell apart.

use std::collections::VecDeque;

use leakscope_api::types::{Degradation, LeakPattern, SiteKind, Verdict};

use super::history::Sample;
use super::stats::{mann_kendall, theil_sen};

/// Thresholds of the rules (flags of `leakscope daemon` and `leakscope report`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Seconds of history a verdict looks at.
    pub window: f64,
    /// Samples a site needs before it is judged.
    pub min_samples: usize,
    /// The Mann–Kendall one-sided p-value below which a rise over the window counts.
    pub p_value: f64,
    /// The rise must continue in the window's second half (p-value there below this, and
    /// a slope there of at least half the whole window's): a cache that grew and then
    /// levelled off, or a ramp of slow tasks that then complete as fast as they start, is
    /// not a leak, even while the end of its ramp is still in the window.
    pub p_value_recent: f64,
    /// Tasks a site must gain over the window.
    pub min_task_growth: f64,
    /// Bytes per second a heap site must gain (Theil–Sen slope).
    pub min_heap_growth_per_second: f64,
    /// Share of its size at the window's start a heap site must gain.
    pub min_heap_growth_ratio: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            window: 120.0,
            min_samples: 12,
            p_value: 0.01,
            p_value_recent: 0.05,
            min_task_growth: 3.0,
            // 16 KiB/s ≈ 1.3 GiB a day: below this, the predict_linear alert on
            // leakscope_heap_live_bytes is the better judge (it sees hours, not minutes).
            min_heap_growth_per_second: 16.0 * 1024.0,
            min_heap_growth_ratio: 0.05,
        }
    }
}

/// What the rules concluded about one site.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub score: f64,
    pub pattern: Option<LeakPattern>,
    pub reason: String,
    pub remedy: Option<&'static str>,
    pub growth_per_second: f64,
}

pub const REMEDY_NEVER_COMPLETE: &str = "Keep each task's JoinHandle (or an AbortHandle) and \
    abort it when its work is no longer wanted (the client went away, shutdown); a loop \
    feeding a channel must stop when send() fails or tx.closed() resolves; a task awaiting \
    a future nobody completes needs a timeout or a cancellation token.";
pub const REMEDY_ACCUMULATE: &str = "Some calls await something that never resolves: bound \
    each task's wait with tokio::time::timeout, and make sure every sender, Notify or \
    oneshot it waits on is completed or dropped.";
pub const REMEDY_HEAP: &str = "State that only grows: bound it (a capacity or an LRU), \
    evict an entry when its owner ends (the request, the connection, the client), or await \
    the task that fills it.";

/// The series' trend over the window and in its second half, and its slope.
struct Growth {
    p: f64,
    p_recent: f64,
    slope: f64,
    slope_recent: f64,
    gained: f64,
}

impl Growth {
    /// Rising over the window, and still rising at a comparable pace in its second half.
    fn sustained(&self, limits: &Thresholds) -> bool {
        self.p < limits.p_value
            && self.p_recent < limits.p_value_recent
            && self.slope > 0.0
            && self.slope_recent >= 0.5 * self.slope
    }
}

fn growth(samples: &VecDeque<Sample>) -> Growth {
    let values: Vec<f64> = samples.iter().map(|s| s.value).collect();
    let points: Vec<(f64, f64)> = samples.iter().map(|s| (s.t, s.value)).collect();
    let half = values.len() / 2;
    Growth {
        p: mann_kendall(&values).p_rising,
        p_recent: mann_kendall(&values[half..]).p_rising,
        slope: theil_sen(&points).unwrap_or(0.0),
        slope_recent: theil_sen(&points[half..]).unwrap_or(0.0),
        gained: values.last().copied().unwrap_or(0.0) - values.first().copied().unwrap_or(0.0),
    }
}

/// Not a suspect, for `reason`.
fn ok(reason: String, growth_per_second: f64) -> Judgement {
    Judgement {
        verdict: Verdict::Ok,
        score: 0.0,
        pattern: None,
        reason,
        remedy: None,
        growth_per_second,
    }
}

fn span(samples: &VecDeque<Sample>) -> f64 {
    match (samples.front(), samples.back()) {
        (Some(a), Some(b)) => b.t - a.t,
        _ => 0.0,
    }
}

fn warming_up(samples: &VecDeque<Sample>, limits: &Thresholds) -> Option<Judgement> {
    (samples.len() < limits.min_samples).then(|| Judgement {
        verdict: Verdict::WarmingUp,
        score: 0.0,
        pattern: None,
        reason: format!(
            "{} of the {} samples needed to judge",
            samples.len(),
            limits.min_samples
        ),
        remedy: None,
        growth_per_second: 0.0,
    })
}

/// The reasons among `reasons` (a process's degradations) that make a `kind` site's window
/// incomplete, in words ("" when none does). A heap site named after a task (`task_cell`:
/// the cells of a spawn site's tasks) owes its name to task events, and its folding into a
/// task suspect to that site's verdict: lost task events make it incomplete too, or the
/// leaked tasks' cells would be paged on their own while their task site cannot be judged.
pub fn incomplete(reasons: &[Degradation], kind: SiteKind, task_cell: bool) -> String {
    reasons
        .iter()
        .filter(|d| d.reason.affects(kind) || (task_cell && d.reason.affects(SiteKind::Task)))
        .map(|d| format!("{}: {}", d.reason.as_str(), d.detail))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Not judged: the site's process lost data within the window (`why`). A count built from
/// incomplete events can look like a leak (completions lost) or hide one (spawns lost).
pub fn cannot_judge(why: String) -> Judgement {
    Judgement {
        verdict: Verdict::CannotJudge,
        score: 0.0,
        pattern: None,
        reason: format!("its process's figures are incomplete in this window ({why})"),
        remedy: None,
        growth_per_second: 0.0,
    }
}

/// Judges a task site from its samples (value = alive tasks). `census_only`: the samples'
/// spawned and completed counts are tasks the censuses listed anew and no longer listed
/// (`--tasks census`), and the reason says so.
pub fn judge_tasks(
    samples: &VecDeque<Sample>,
    completion_hooked: bool,
    census_only: bool,
    oldest_alive_seconds: f64,
    limits: &Thresholds,
) -> Judgement {
    if !completion_hooked {
        return Judgement {
            verdict: Verdict::CannotJudge,
            score: 0.0,
            pattern: None,
            reason: "the completion hook of this site's tasks could not be placed, so finished \
                     tasks would look alive; `leakscope inspect` shows why"
                .to_string(),
            remedy: None,
            growth_per_second: 0.0,
        };
    }
    if let Some(judgement) = warming_up(samples, limits) {
        return judgement;
    }
    let g = growth(samples);
    let (first, last) = (samples[0], samples[samples.len() - 1]);
    let spawned = last.spawned.saturating_sub(first.spawned);
    let completed = last.completed.saturating_sub(first.completed);
    let window = span(samples);
    let rising = g.sustained(limits) && g.gained >= limits.min_task_growth;
    if !rising {
        let growth = if g.sustained(limits) {
            format!(
                "rising, but by {} (less than the {} that make a suspect)",
                g.gained, limits.min_task_growth
            )
        } else {
            "no sustained growth".to_string()
        };
        let counts = if census_only {
            format!("the censuses listed {spawned} new and lost {completed}")
        } else {
            format!("{spawned} spawned and {completed} completed")
        };
        let reason = format!(
            "{} alive; {counts} over the last {}; {growth}",
            last.value,
            duration(window)
        );
        return ok(reason, g.slope);
    }
    let confidence = 1.0 - g.p;
    let (pattern, strength, remedy, completions) = if completed == 0 {
        (
            LeakPattern::TasksNeverComplete,
            1.0,
            REMEDY_NEVER_COMPLETE,
            if census_only {
                format!("none of the {spawned} new ones the censuses listed in that time is gone")
            } else {
                format!("none of the {spawned} spawned in that time completed")
            },
        )
    } else {
        (
            LeakPattern::TasksAccumulate,
            (g.gained / spawned.max(1) as f64).clamp(0.0, 1.0),
            REMEDY_ACCUMULATE,
            if census_only {
                format!(
                    "{completed} of the {spawned} new ones the censuses listed in that time \
                     are gone, the rest pile up"
                )
            } else {
                format!(
                    "{completed} of the {spawned} spawned in that time completed, the rest pile up"
                )
            },
        )
    };
    Judgement {
        verdict: Verdict::Suspect,
        score: (confidence * strength).clamp(f64::MIN_POSITIVE, 1.0),
        pattern: Some(pattern),
        reason: format!(
            "{} tasks alive, {:+.1}/min for {}; {completions}; oldest {}",
            last.value,
            g.slope * 60.0,
            duration(window),
            duration(oldest_alive_seconds)
        ),
        remedy: Some(remedy),
        growth_per_second: g.slope,
    }
}

/// Judges a heap callsite from its samples (value = live bytes).
pub fn judge_heap(samples: &VecDeque<Sample>, limits: &Thresholds) -> Judgement {
    if let Some(judgement) = warming_up(samples, limits) {
        return judgement;
    }
    let g = growth(samples);
    let first = samples[0].value;
    let last = samples[samples.len() - 1].value;
    let window = span(samples);
    let relative = g.gained / first.max(1.0);
    let rising = g.sustained(limits)
        && g.slope >= limits.min_heap_growth_per_second
        && relative >= limits.min_heap_growth_ratio;
    if !rising {
        let growth = if g.sustained(limits) {
            format!(
                "rising steadily, but slower than {}/s or by less than {:.0} % of its size (the \
                 floor of a suspect; the predict_linear alert watches slower leaks)",
                bytes(limits.min_heap_growth_per_second),
                limits.min_heap_growth_ratio * 100.0
            )
        } else {
            "no sustained growth".to_string()
        };
        let reason = format!(
            "{} live; {} over the last {}; {growth}",
            bytes(last),
            signed_bytes(g.gained),
            duration(window)
        );
        return ok(reason, g.slope);
    }
    Judgement {
        verdict: Verdict::Suspect,
        score: ((1.0 - g.p) * relative.min(1.0)).clamp(f64::MIN_POSITIVE, 1.0),
        pattern: Some(LeakPattern::HeapGrows),
        reason: format!(
            "{} live, {}/min for {} ({} at the start): allocated and not freed",
            bytes(last),
            signed_bytes(g.slope * 60.0),
            duration(window),
            bytes(first)
        ),
        remedy: Some(REMEDY_HEAP),
        growth_per_second: g.slope,
    }
}

/// `95 s`, `12 min`, `3.5 h`.
pub fn duration(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("{seconds:.0} s")
    } else if seconds < 7200.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}

/// `512 B`, `3.2 KiB`, `11.0 MiB`, `1.5 GiB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn signed_bytes(n: f64) -> String {
    if n >= 0.0 {
        format!("+{}", bytes(n))
    } else {
        format!("-{}", bytes(-n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sample every 5 s for 2 minutes: `value(t)`, cumulative `spawned(t)`,
    /// `completed(t)`.
    fn series(
        value: impl Fn(f64) -> f64,
        spawned: impl Fn(f64) -> u64,
        completed: impl Fn(f64) -> u64,
    ) -> VecDeque<Sample> {
        (0..25)
            .map(|i| {
                let t = f64::from(i) * 5.0;
                Sample {
                    t,
                    value: value(t),
                    spawned: spawned(t),
                    completed: completed(t),
                }
            })
            .collect()
    }

    fn limits() -> Thresholds {
        Thresholds::default()
    }

    #[test]
    fn a_loop_spawned_per_request_that_never_ends_is_a_suspect() {
        // 2 requests/s, each spawns a task that never completes.
        let s = series(|t| 2.0 * t, |t| (2.0 * t) as u64, |_| 0);
        let j = judge_tasks(&s, true, false, 120.0, &limits());
        assert_eq!(j.verdict, Verdict::Suspect, "{j:?}");
        assert_eq!(j.pattern, Some(LeakPattern::TasksNeverComplete));
        assert!(j.score > 0.99, "{j:?}");
        assert!((j.growth_per_second - 2.0).abs() < 1e-9);
        assert!(
            j.reason
                .contains("240 tasks alive, +120.0/min for 2 min; none of the 240 spawned"),
            "{}",
            j.reason
        );
        assert_eq!(j.remedy, Some(REMEDY_NEVER_COMPLETE));
    }

    #[test]
    fn calls_that_sometimes_hang_accumulate() {
        // 10 spawns/s, 9 complete; one in ten hangs forever.
        let s = series(|t| t, |t| (10.0 * t) as u64, |t| (9.0 * t) as u64);
        let j = judge_tasks(&s, true, false, 120.0, &limits());
        assert_eq!(j.pattern, Some(LeakPattern::TasksAccumulate), "{j:?}");
        assert!((j.score - 0.1).abs() < 0.01, "{j:?}");
    }

    #[test]
    fn steady_bounded_and_draining_sites_are_not_suspects() {
        let limits = limits();
        // Long-lived workers or keep-alive connections: a constant count.
        let steady = series(|_| 8.0, |_| 8, |_| 0);
        // Slow but bounded: 20 s tasks at 1/s ramp to 20 alive, then stay there.
        let slow = series(
            |t| t.min(20.0),
            |t| t as u64,
            |t| (t - 20.0).max(0.0) as u64,
        );
        // A burst that drains.
        let burst = series(
            |t| {
                if t < 30.0 {
                    3.0 * t
                } else {
                    (90.0 - 3.0 * (t - 30.0)).max(0.0)
                }
            },
            |t| (3.0 * t.min(30.0)) as u64,
            |t| (3.0 * (t - 30.0).max(0.0)) as u64,
        );
        // Noise around a level, as per-request tasks under steady load.
        let noisy = series(
            |t| 10.0 + ((t / 5.0) as i64 % 3) as f64,
            |t| (50.0 * t) as u64,
            |t| (50.0 * t) as u64,
        );
        for (name, s) in [
            ("steady", steady),
            ("slow", slow),
            ("burst", burst),
            ("noisy", noisy),
        ] {
            let j = judge_tasks(&s, true, false, 10.0, &limits);
            assert_eq!(j.verdict, Verdict::Ok, "{name}: {j:?}");
        }
    }

    #[test]
    fn a_site_without_a_completion_hook_cannot_be_judged() {
        let s = series(|t| 2.0 * t, |t| (2.0 * t) as u64, |_| 0);
        let j = judge_tasks(&s, false, false, 120.0, &limits());
        assert_eq!(j.verdict, Verdict::CannotJudge);
        assert!(j.reason.contains("completion hook"));
    }

    #[test]
    fn too_few_samples_are_warming_up() {
        let s: VecDeque<Sample> = series(|t| t, |t| t as u64, |_| 0)
            .into_iter()
            .take(5)
            .collect();
        assert_eq!(
            judge_tasks(&s, true, false, 1.0, &limits()).verdict,
            Verdict::WarmingUp
        );
        assert_eq!(judge_heap(&s, &limits()).verdict, Verdict::WarmingUp);
    }

    #[test]
    fn heap_that_only_grows_is_a_suspect_and_a_plateau_is_not() {
        let kib = 1024.0;
        // 256 KiB per request, one request a second, on top of 1 MiB.
        let leak = series(|t| 1024.0 * kib + 256.0 * kib * t, |_| 0, |_| 0);
        let j = judge_heap(&leak, &limits());
        assert_eq!(j.verdict, Verdict::Suspect, "{j:?}");
        assert_eq!(j.pattern, Some(LeakPattern::HeapGrows));
        assert!(
            j.reason
                .starts_with("31.0 MiB live, +15.0 MiB/min for 2 min (1.0 MiB at the start)"),
            "{}",
            j.reason
        );
        // A cache filled in the first 40 s, flat since.
        let cache = series(|t| 100.0 * kib * t.min(40.0), |_| 0, |_| 0);
        assert_eq!(judge_heap(&cache, &limits()).verdict, Verdict::Ok);
        // The same cache still filling early in the window's second half (as seen a
        // little after attach).
        let cache = series(|t| 100.0 * kib * t.min(70.0), |_| 0, |_| 0);
        assert_eq!(judge_heap(&cache, &limits()).verdict, Verdict::Ok);
        // Slow growth below the rate floor: not a suspect, and the reason says why.
        let slow = series(|t| 1024.0 * kib + 100.0 * t, |_| 0, |_| 0);
        let j = judge_heap(&slow, &limits());
        assert_eq!(j.verdict, Verdict::Ok);
        assert!(
            j.reason
                .contains("rising steadily, but slower than 16.0 KiB/s"),
            "{}",
            j.reason
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(duration(95.0), "95 s");
        assert_eq!(duration(720.0), "12 min");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(11.0 * 1024.0 * 1024.0), "11.0 MiB");
        assert_eq!(signed_bytes(-2048.0), "-2.0 KiB");
    }
}

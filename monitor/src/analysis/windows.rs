//! Verdicts from `--heap adaptive`'s windows: a callsite whose blocks, allocated while the
//! allocation hooks were on, keep outliving the follow phase window after window is state
//! that only grows. Its leak rate is measured in the windows; its bytes since it was first
//! seen are extrapolated from that rate, and said to be. A window that lost heap data while
//! it was open (events, or allocations the kernel could not track) is not judged from: its
//! survivors may be short.

use std::collections::BTreeMap;

use leakscope_api::types::{HistorySample, LeakPattern, SiteKind, SiteVerdict, Verdict};

use super::verdict::{REMEDY_HEAP, Thresholds, bytes, duration};
use crate::state::heap_windows::ProcessWindows;

/// What the windows say of one callsite.
#[derive(Debug, Clone, PartialEq)]
pub struct CallsiteFinding {
    pub site: String,
    pub location: Option<String>,
    /// Windows (of those kept) in which the callsite was seen at all.
    pub windows_seen: usize,
    /// Windows in which its survivors amount to a leak rate above the heap threshold.
    pub windows_leaking: usize,
    pub latest_leaking: bool,
    /// Bytes that outlived the follow phase, all kept windows together (measured).
    pub survived_bytes: u64,
    /// Survivors per second of allocation hooks, over the leaking windows (measured).
    pub rate: f64,
    /// `rate` times the time from the first leaking window's start to the latest one's
    /// end (windows open only while memory grows): not measured.
    pub extrapolated_bytes: f64,
    /// Share of the latest window's bytes (live when the allocation hooks came off) that
    /// outlived the follow phase.
    pub survival: f64,
    pub following_seconds: f64,
    pub samples: Vec<HistorySample>,
}

/// Every callsite of `process`'s kept windows that lost nothing.
pub fn findings(process: &ProcessWindows, limits: &Thresholds) -> Vec<CallsiteFinding> {
    // Per callsite: the finding, and when its first leaking window started and its latest
    // ended.
    type Span = (f64, f64);
    let mut by_site: BTreeMap<(String, Option<String>), (CallsiteFinding, Span)> = BTreeMap::new();
    let complete: Vec<_> = process
        .windows
        .iter()
        .filter(|w| w.losses.is_none())
        .collect();
    for (index, window) in complete.iter().enumerate() {
        let is_latest = index + 1 == complete.len();
        for callsite in &window.callsites {
            let (finding, leaking_span) = by_site
                .entry((callsite.site.clone(), callsite.location.clone()))
                .or_insert_with(|| {
                    let finding = CallsiteFinding {
                        site: callsite.site.clone(),
                        location: callsite.location.clone(),
                        windows_seen: 0,
                        windows_leaking: 0,
                        latest_leaking: false,
                        survived_bytes: 0,
                        rate: 0.0,
                        extrapolated_bytes: 0.0,
                        survival: 0.0,
                        following_seconds: window.following_seconds,
                        samples: Vec::new(),
                    };
                    (finding, (0.0, 0.0))
                });
            finding.windows_seen += 1;
            finding.survived_bytes += callsite.survived_bytes;
            finding.samples.push(HistorySample {
                t: window.started,
                value: callsite.survived_bytes as f64,
            });
            let rate = callsite.survived_bytes as f64 / window.allocating_seconds.max(1e-3);
            if rate >= limits.min_heap_growth_per_second {
                // Rates averaged over the leaking windows; the extrapolation starts at the
                // first of them.
                if finding.windows_leaking == 0 {
                    leaking_span.0 = window.started;
                }
                leaking_span.1 =
                    window.started + window.allocating_seconds + window.following_seconds;
                finding.rate += rate;
                finding.windows_leaking += 1;
                finding.latest_leaking = is_latest;
            }
            if is_latest {
                finding.survival =
                    callsite.survived_bytes as f64 / callsite.live_at_close_bytes.max(1) as f64;
                finding.following_seconds = window.following_seconds;
            }
        }
    }
    by_site
        .into_values()
        .map(|(mut f, (first, last))| {
            if f.windows_leaking > 0 {
                f.rate /= f.windows_leaking as f64;
                f.extrapolated_bytes = f.rate * (last - first).max(0.0);
            }
            f
        })
        .collect()
}

/// A verdict per callsite of `process`'s windows: suspect when at least `min_windows`
/// windows left survivors there at a leak rate, the latest of them included. The bytes it
/// leaked from its first such window to its latest are extrapolated from the rate
/// measured in the windows, and said to be.
pub fn judge(
    pid: u32,
    process: &ProcessWindows,
    limits: &Thresholds,
    min_windows: usize,
) -> Vec<SiteVerdict> {
    let windows = process
        .windows
        .iter()
        .filter(|w| w.losses.is_none())
        .count();
    let left_out = match process.windows.len() - windows {
        0 => String::new(),
        n => format!(" ({n} more with losses left out)"),
    };
    // The latest window decides whether a leak goes on: with losses in it, nobody can say.
    let latest_losses = process.windows.back().and_then(|w| w.losses.as_deref());
    findings(process, limits)
        .into_iter()
        .map(|f| {
            let evidence = format!(
                "blocks allocated here in {} of the last {windows} complete heap \
                 windows{left_out} outlived the {} each window followed them ({:.0} % of the \
                 latest window's); {} survived",
                f.windows_leaking,
                duration(f.following_seconds),
                f.survival * 100.0,
                bytes(f.survived_bytes as f64)
            );
            let suspect = f.windows_leaking >= min_windows.max(1) && f.latest_leaking;
            let (verdict, score, pattern, remedy, reason) = if let Some(why) = latest_losses {
                let reason = format!(
                    "the latest heap window lost data while it was open ({why}), so whether \
                     blocks allocated here still outlive their windows is unknown; judged \
                     again after a window without loss. Before it: {evidence}"
                );
                (Verdict::CannotJudge, 0.0, None, None, reason)
            } else if suspect {
                let reason = format!(
                    "{evidence}, {}/s while the allocation hooks were on; extrapolated (not \
                     measured): ≈{} from the first such window to the latest",
                    bytes(f.rate),
                    bytes(f.extrapolated_bytes)
                );
                let score = (f.windows_leaking as f64 / windows as f64) * f.survival.min(1.0);
                (
                    Verdict::Suspect,
                    score.clamp(f64::MIN_POSITIVE, 1.0),
                    Some(LeakPattern::HeapGrows),
                    Some(REMEDY_HEAP.to_string()),
                    reason,
                )
            } else {
                let reason = if f.windows_leaking == 0 {
                    format!("{evidence}: below a leak's rate, freed in time")
                } else {
                    format!(
                        "{evidence}: not yet seen in {min_windows} windows including the \
                         latest"
                    )
                };
                (Verdict::Ok, 0.0, None, None, reason)
            };
            SiteVerdict {
                labels: Default::default(),
                pid,
                exe: process.exe.clone(),
                kind: SiteKind::Heap,
                site: f.site,
                location: f.location,
                verdict,
                score,
                pattern,
                reason,
                remedy,
                growth_per_second: f.rate,
                current: f.survived_bytes as f64,
                oldest_alive_seconds: None,
                suspect_since: None,
                samples: f.samples,
                // A heap callsite's verdict: no tasks in it.
                alive_before_attach: 0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::heap_windows::{CallsiteSurvivors, WindowRecord};

    fn window(started: f64, sites: &[(&str, u64, u64)]) -> WindowRecord {
        WindowRecord {
            started,
            allocating_seconds: 10.0,
            following_seconds: 20.0,
            callsites: sites
                .iter()
                .map(|&(site, live, survived)| CallsiteSurvivors {
                    site: site.to_string(),
                    location: None,
                    live_at_close_bytes: live,
                    survived_bytes: survived,
                    survived_blocks: survived / 1024,
                })
                .collect(),
            losses: None,
        }
    }

    fn process(windows: Vec<WindowRecord>) -> ProcessWindows {
        ProcessWindows {
            exe: "app".into(),
            windows: windows.into(),
            ..Default::default()
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn survivors_in_repeated_windows_make_a_suspect_with_an_extrapolation() {
        let p = process(vec![
            window(0.0, &[("leak", 10 * MIB, 10 * MIB), ("bounded", MIB, 0)]),
            window(100.0, &[("leak", 10 * MIB, 10 * MIB), ("bounded", MIB, 0)]),
        ]);
        let verdicts = judge(1, &p, &Thresholds::default(), 2);
        let leak = verdicts.iter().find(|v| v.site == "leak").unwrap();
        assert_eq!(leak.verdict, Verdict::Suspect);
        assert_eq!(leak.current, (20 * MIB) as f64);
        // 1 MiB/s in the windows, over the 130 s from the first's start to the second's end.
        assert!((leak.growth_per_second - MIB as f64).abs() < 1.0);
        assert!(leak.reason.contains("extrapolated"), "{}", leak.reason);
        assert!(leak.reason.contains("130.0 MiB"), "{}", leak.reason);
        let bounded = verdicts.iter().find(|v| v.site == "bounded").unwrap();
        assert_eq!(bounded.verdict, Verdict::Ok);
    }

    #[test]
    fn one_window_or_a_leak_that_stopped_is_not_a_suspect() {
        let limits = Thresholds::default();
        let once = process(vec![window(0.0, &[("leak", 10 * MIB, 10 * MIB)])]);
        assert_eq!(judge(1, &once, &limits, 2)[0].verdict, Verdict::Ok);
        let stopped = process(vec![
            window(0.0, &[("leak", 10 * MIB, 10 * MIB)]),
            window(100.0, &[("leak", 10 * MIB, 10 * MIB)]),
            window(200.0, &[("leak", MIB, 0)]),
        ]);
        assert_eq!(judge(1, &stopped, &limits, 2)[0].verdict, Verdict::Ok);
        // Survivors below the heap threshold's rate (16 KiB/s) are not a leak.
        let slow = process(vec![
            window(0.0, &[("slow", 100 << 10, 100 << 10)]),
            window(100.0, &[("slow", 100 << 10, 100 << 10)]),
        ]);
        assert_eq!(judge(1, &slow, &limits, 2)[0].verdict, Verdict::Ok);
    }

    /// A window that lost heap data is not judged from: as the latest, it leaves every
    /// callsite `cannot_judge`; older, it is left out and said to be.
    #[test]
    fn windows_with_losses_are_not_judged_from() {
        let limits = Thresholds::default();
        let lossy = |w: WindowRecord| WindowRecord {
            losses: Some("3 allocations not tracked".into()),
            ..w
        };
        let latest_lossy = process(vec![
            window(0.0, &[("leak", 10 * MIB, 10 * MIB)]),
            window(100.0, &[("leak", 10 * MIB, 10 * MIB)]),
            lossy(window(200.0, &[("leak", 10 * MIB, 10 * MIB)])),
        ]);
        let v = &judge(1, &latest_lossy, &limits, 2)[0];
        assert_eq!(v.verdict, Verdict::CannotJudge, "{v:?}");
        assert!(
            v.reason.contains("3 allocations not tracked"),
            "{}",
            v.reason
        );
        // An older lossy window: two complete ones still make the suspect, counted
        // without it. Without the two, its survivors alone would not have.
        let older_lossy = process(vec![
            lossy(window(0.0, &[("leak", 10 * MIB, 10 * MIB)])),
            window(100.0, &[("leak", 10 * MIB, 10 * MIB)]),
            window(200.0, &[("leak", 10 * MIB, 10 * MIB)]),
        ]);
        let v = &judge(1, &older_lossy, &limits, 2)[0];
        assert_eq!(v.verdict, Verdict::Suspect, "{v:?}");
        assert_eq!(v.current, (20 * MIB) as f64);
        assert!(
            v.reason.contains("1 more with losses left out"),
            "{}",
            v.reason
        );
        let one_complete = process(vec![
            lossy(window(0.0, &[("leak", 10 * MIB, 10 * MIB)])),
            window(100.0, &[("leak", 10 * MIB, 10 * MIB)]),
        ]);
        assert_eq!(judge(1, &one_complete, &limits, 2)[0].verdict, Verdict::Ok);
    }
}

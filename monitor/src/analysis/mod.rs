//! Leak verdicts: every sampling period the daemon hands the analysis a snapshot of the
//! ledgers; each site's recent history is judged by robust trend statistics (`stats`)
//! under the rules of `verdict`, and the verdicts are kept for the exports.
//!
//! Task sites are judged on their alive count, heap callsites on their live bytes (summed
//! over the tasks that allocated there). A heap site whose memory belongs to a task
//! suspect (the leaked tasks' own cells, or what they allocated) is folded into that
//! suspect rather than reported twice: one leak, one page.

pub mod history;
pub mod stats;
#[cfg(test)]
mod tests;
pub mod verdict;
pub mod windows;

use std::collections::{HashMap, HashSet};

use leakscope_api::types::{
    Degradation, HeapGroupSnapshot, HistorySample, SiteKind, SiteSnapshot, SiteVerdict, Verdict,
    VerdictsResponse,
};

use crate::state::heap::TASK_CELL;
use history::{Histories, Sample};
pub use verdict::Thresholds;
use verdict::{judge_heap, judge_tasks};

/// How the analysis samples and what it keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnalysisConfig {
    /// Seconds between samples.
    pub period: f64,
    pub thresholds: Thresholds,
    /// Sites tracked at once (tasks and heap together); beyond, new sites are counted.
    pub max_sites: usize,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        Self {
            period: 5.0,
            thresholds: Thresholds::default(),
            max_sites: 10_000,
        }
    }
}

impl AnalysisConfig {
    /// Sampling every `period` seconds over a `window`: judged once half the window's
    /// samples are in (at least 6).
    pub fn new(period: f64, window: f64) -> Self {
        let period = period.max(0.05);
        let window = window.max(period * 6.0);
        Self {
            period,
            thresholds: Thresholds {
                window,
                min_samples: ((window / period / 2.0).ceil() as usize).max(6),
                ..Thresholds::default()
            },
            ..Self::default()
        }
    }
}

/// (pid, kind, site, location): one judged series.
type SiteKey = (u32, SiteKind, String, Option<String>);

/// What is known of a site besides its samples, from the latest snapshot.
#[derive(Debug, Clone)]
struct Latest {
    exe: String,
    completion_hooked: bool,
    /// `--tasks census`: the census alone counts this site's tasks.
    census_only: bool,
    oldest_alive_seconds: f64,
    /// Task sites: alive tasks spawned before attach (found by the census), left out of
    /// the samples (they can only decline, and the first census may land after the first
    /// sample: a step that is no growth) and told in the reason.
    alive_before_attach: u64,
    /// Heap sites: the task site holding the most of its bytes, and how many.
    top_task_site: Option<(String, u64)>,
}

/// The histories and the current verdicts.
#[derive(Debug)]
pub struct Analyzer {
    config: AnalysisConfig,
    histories: Histories<SiteKey>,
    latest: HashMap<SiteKey, Latest>,
    suspect_since: HashMap<SiteKey, f64>,
    verdicts: Vec<SiteVerdict>,
    /// Processes whose figures are incomplete now (`state::health`): their affected sites
    /// are not judged.
    degraded: HashMap<u32, Vec<Degradation>>,
    /// `--heap adaptive`: the heap verdicts its windows made (`windows`), judged with the
    /// rest at the next sample.
    window_verdicts: Vec<SiteVerdict>,
}

impl Analyzer {
    pub fn new(config: AnalysisConfig) -> Self {
        Self {
            config,
            histories: Histories::new(config.thresholds.window, config.period, config.max_sites),
            latest: HashMap::new(),
            suspect_since: HashMap::new(),
            verdicts: Vec::new(),
            degraded: HashMap::new(),
            window_verdicts: Vec::new(),
        }
    }

    /// The heap windows' verdicts (`--heap adaptive`), for the next judgement.
    pub fn set_window_verdicts(&mut self, verdicts: Vec<SiteVerdict>) {
        self.window_verdicts = verdicts;
    }

    /// The processes whose figures are incomplete, for the next judgement: a site is never
    /// called a suspect (nor ok) from a window in which its process lost events.
    pub fn set_degraded(&mut self, degraded: HashMap<u32, Vec<Degradation>>) {
        self.degraded = degraded;
    }

    pub fn config(&self) -> &AnalysisConfig {
        &self.config
    }

    /// New thresholds for the next judgements (a config reload); the history kept stays.
    pub fn set_thresholds(&mut self, thresholds: Thresholds) {
        self.config.thresholds = thresholds;
    }

    /// Takes one sample of every site at `t` seconds and judges them all again.
    pub fn observe(&mut self, t: f64, tasks: &[SiteSnapshot], heap: &[HeapGroupSnapshot]) {
        self.latest.clear();
        for row in tasks {
            let key = (
                row.pid,
                SiteKind::Task,
                row.site.clone(),
                row.location.clone(),
            );
            let sample = Sample {
                t,
                value: row.alive.saturating_sub(row.alive_before_attach) as f64,
                spawned: row.census_seen.unwrap_or(row.spawned),
                completed: row.census_gone.unwrap_or(row.completed),
            };
            if self.histories.push(&key, sample) {
                self.latest.insert(
                    key,
                    Latest {
                        exe: row.exe.clone(),
                        completion_hooked: row.completion_hooked,
                        census_only: row.census_seen.is_some(),
                        oldest_alive_seconds: row.oldest_alive_seconds,
                        alive_before_attach: row.alive_before_attach,
                        top_task_site: None,
                    },
                );
            }
        }
        // Heap groups are (callsite, task site): a callsite is judged on all of its bytes.
        let mut callsites: HashMap<SiteKey, (String, u64, HashMap<&str, u64>)> = HashMap::new();
        for row in heap {
            let key = (
                row.pid,
                SiteKind::Heap,
                row.site.clone(),
                row.location.clone(),
            );
            let entry = callsites
                .entry(key)
                .or_insert_with(|| (row.exe.clone(), 0, HashMap::new()));
            entry.1 += row.live_bytes;
            *entry.2.entry(row.task_site.as_str()).or_default() += row.live_bytes;
        }
        for (key, (exe, live, by_task)) in callsites {
            let sample = Sample {
                t,
                value: live as f64,
                spawned: 0,
                completed: 0,
            };
            if self.histories.push(&key, sample) {
                let top = by_task
                    .into_iter()
                    .max_by_key(|&(_, bytes)| bytes)
                    .map(|(site, bytes)| (site.to_string(), bytes));
                self.latest.insert(
                    key,
                    Latest {
                        exe,
                        completion_hooked: true,
                        census_only: false,
                        oldest_alive_seconds: 0.0,
                        alive_before_attach: 0,
                        top_task_site: top,
                    },
                );
            }
        }
        // A site gone from the snapshot (its process exited, or its heap was all freed
        // and left the ledger) starts over if it comes back.
        let latest = &self.latest;
        self.histories.retain(|key| latest.contains_key(key));
        self.suspect_since.retain(|key, _| latest.contains_key(key));
        self.judge(t);
    }

    fn judge(&mut self, t: f64) {
        let limits = self.config.thresholds;
        let mut verdicts = Vec::with_capacity(self.latest.len());
        for (key, latest) in &self.latest {
            let Some(samples) = self.histories.get(key) else {
                continue;
            };
            let incomplete = self
                .degraded
                .get(&key.0)
                .map(|reasons| verdict::incomplete(reasons, key.1, key.2.starts_with(TASK_CELL)))
                .unwrap_or_default();
            let mut judgement = match key.1 {
                _ if !incomplete.is_empty() => verdict::cannot_judge(incomplete),
                SiteKind::Task => judge_tasks(
                    samples,
                    latest.completion_hooked,
                    latest.census_only,
                    latest.oldest_alive_seconds,
                    &limits,
                ),
                SiteKind::Heap => judge_heap(samples, &limits),
            };
            if latest.alive_before_attach > 0 {
                judgement.reason.push_str(&format!(
                    "; and {} alive since before leakscope attached (found by the task census, \
                     ages at least {})",
                    latest.alive_before_attach,
                    verdict::duration(latest.oldest_alive_seconds)
                ));
            }
            verdicts.push(SiteVerdict {
                labels: Default::default(),
                pid: key.0,
                exe: latest.exe.clone(),
                kind: key.1,
                site: key.2.clone(),
                location: key.3.clone(),
                verdict: judgement.verdict,
                score: judgement.score,
                pattern: judgement.pattern,
                reason: judgement.reason,
                remedy: judgement.remedy.map(str::to_string),
                growth_per_second: judgement.growth_per_second,
                current: samples.back().map_or(0.0, |s| s.value),
                oldest_alive_seconds: (key.1 == SiteKind::Task)
                    .then_some(latest.oldest_alive_seconds),
                alive_before_attach: latest.alive_before_attach,
                suspect_since: None,
                samples: samples
                    .iter()
                    .map(|s| HistorySample {
                        t: s.t,
                        value: s.value,
                    })
                    .collect(),
            });
        }
        verdicts.extend(self.window_verdicts.iter().cloned());
        self.fold_heap_into_task_suspects(&mut verdicts);
        for v in &mut verdicts {
            let key = (v.pid, v.kind, v.site.clone(), v.location.clone());
            if v.verdict == Verdict::Suspect {
                v.suspect_since = Some(*self.suspect_since.entry(key).or_insert(t));
            } else {
                self.suspect_since.remove(&key);
            }
        }
        verdicts.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| (a.pid, a.kind, &a.site).cmp(&(b.pid, b.kind, &b.site)))
        });
        self.verdicts = verdicts;
    }

    /// A heap site whose bytes are the cells of suspect tasks, or were mostly allocated by
    /// them, is part of the task suspect's leak: its bytes join that suspect's reason and
    /// it is not a suspect on its own ("held by the leaked tasks of …").
    fn fold_heap_into_task_suspects(&self, verdicts: &mut [SiteVerdict]) {
        let task_suspects: HashSet<(u32, String)> = verdicts
            .iter()
            .filter(|v| v.kind == SiteKind::Task && v.verdict == Verdict::Suspect)
            .map(|v| (v.pid, v.site.clone()))
            .collect();
        let mut held: HashMap<(u32, String), u64> = HashMap::new();
        for v in verdicts.iter_mut() {
            if v.kind != SiteKind::Heap {
                continue;
            }
            let key = (v.pid, SiteKind::Heap, v.site.clone(), v.location.clone());
            let owner = v
                .site
                .strip_prefix(TASK_CELL)
                .map(str::to_string)
                .filter(|spawn_site| task_suspects.contains(&(v.pid, spawn_site.clone())))
                .or_else(|| {
                    let (task_site, bytes) = self.latest.get(&key)?.top_task_site.clone()?;
                    (task_suspects.contains(&(v.pid, task_site.clone()))
                        && bytes as f64 >= 0.5 * v.current)
                        .then_some(task_site)
                });
            if let Some(owner) = owner {
                *held.entry((v.pid, owner.clone())).or_default() += v.current as u64;
                if v.verdict == Verdict::Suspect {
                    v.verdict = Verdict::Ok;
                }
                v.score = 0.0;
                v.pattern = None;
                v.remedy = None;
                v.reason = format!("{}; held by the leaked tasks of {owner}", v.reason);
            }
        }
        for v in verdicts.iter_mut() {
            if let Some(&bytes) = held.get(&(v.pid, v.site.clone()))
                && v.kind == SiteKind::Task
            {
                v.reason = format!(
                    "{}; they hold {} of heap",
                    v.reason,
                    verdict::bytes(bytes as f64)
                );
            }
        }
    }

    /// Every judged site, suspects first.
    pub fn sites(&self) -> VerdictsResponse {
        self.response(|_| true)
    }

    /// Suspects only, highest score first.
    pub fn suspects(&self) -> VerdictsResponse {
        self.response(|v| v.verdict == Verdict::Suspect)
    }

    fn response(&self, keep: impl Fn(&SiteVerdict) -> bool) -> VerdictsResponse {
        VerdictsResponse {
            window_seconds: self.config.thresholds.window,
            sample_seconds: self.config.period,
            sites: self.verdicts.iter().filter(|v| keep(v)).cloned().collect(),
            sites_dropped: self.sites_dropped(),
        }
    }

    pub fn verdicts(&self) -> &[SiteVerdict] {
        &self.verdicts
    }

    /// Sites not tracked because the bound on sites was reached.
    pub fn sites_dropped(&self) -> u64 {
        self.histories.dropped
    }

    /// Samples held, all sites together (for the bench).
    pub fn samples_held(&self) -> usize {
        self.histories.samples()
    }
}

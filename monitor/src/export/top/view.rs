//! What `top` shows, without a terminal: the sites of a [`VerdictsResponse`] sorted and
//! filtered into table rows, their trend as a sparkline, and the numbers as text.

use leakscope_api::types::{HistorySample, SiteKind, SiteVerdict, Verdict, VerdictsResponse};

use crate::analysis::verdict::{bytes, duration};

/// Characters of the trend column.
pub const SPARK_WIDTH: usize = 20;

/// The order of the table; `s` cycles through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    /// Highest leak score first: suspects on top.
    #[default]
    Score,
    /// Fastest growing first.
    Growth,
    /// Most alive tasks or live bytes first (tasks and bytes are compared as numbers).
    Current,
    /// By site name.
    Name,
}

impl SortKey {
    pub fn next(self) -> Self {
        match self {
            Self::Score => Self::Growth,
            Self::Growth => Self::Current,
            Self::Current => Self::Name,
            Self::Name => Self::Score,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Score => "score",
            Self::Growth => "growth",
            Self::Current => "current",
            Self::Name => "name",
        }
    }
}

/// Identifies a site across refreshes, so the selection follows it when rows move.
pub type RowKey = (u32, SiteKind, String, Option<String>);

pub fn row_key(v: &SiteVerdict) -> RowKey {
    (v.pid, v.kind, v.site.clone(), v.location.clone())
}

/// One line of the table, as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: RowKey,
    pub verdict: Verdict,
    pub verdict_text: &'static str,
    pub kind: &'static str,
    pub pid: String,
    /// Alive tasks, or live bytes.
    pub current: String,
    pub growth_per_minute: String,
    /// Age of the oldest alive task (`-` for heap sites).
    pub oldest: String,
    pub trend: String,
    pub site: String,
}

pub fn verdict_text(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Suspect => "SUSPECT",
        Verdict::Ok => "ok",
        Verdict::WarmingUp => "warming up",
        Verdict::CannotJudge => "cannot judge",
    }
}

/// Suspects first, then what still needs attention.
fn verdict_rank(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::Suspect => 0,
        Verdict::CannotJudge => 1,
        Verdict::WarmingUp => 2,
        Verdict::Ok => 3,
    }
}

/// Whether `site` passes the filter: a case-insensitive substring of the site name (an
/// empty filter passes everything).
pub fn matches(site: &SiteVerdict, filter: &str) -> bool {
    filter.is_empty() || site.site.to_lowercase().contains(&filter.to_lowercase())
}

/// The sites of `verdicts` that pass `filter`, in `sort` order (ties by name, then pid).
pub fn visible<'a>(
    verdicts: &'a VerdictsResponse,
    sort: SortKey,
    filter: &str,
) -> Vec<&'a SiteVerdict> {
    let mut sites: Vec<&SiteVerdict> = verdicts
        .sites
        .iter()
        .filter(|v| matches(v, filter))
        .collect();
    let desc = |a: f64, b: f64| b.total_cmp(&a);
    sites.sort_by(|a, b| {
        let primary = match sort {
            SortKey::Score => desc(a.score, b.score)
                .then(verdict_rank(a.verdict).cmp(&verdict_rank(b.verdict)))
                .then(desc(a.growth_per_second, b.growth_per_second)),
            SortKey::Growth => desc(a.growth_per_second, b.growth_per_second),
            SortKey::Current => desc(a.current, b.current),
            SortKey::Name => std::cmp::Ordering::Equal,
        };
        primary
            .then_with(|| a.site.cmp(&b.site))
            .then(a.pid.cmp(&b.pid))
            .then(a.kind.cmp(&b.kind))
            .then_with(|| a.location.cmp(&b.location))
    });
    sites
}

/// The table: `visible` sites as text.
pub fn rows(verdicts: &VerdictsResponse, sort: SortKey, filter: &str) -> Vec<Row> {
    visible(verdicts, sort, filter)
        .into_iter()
        .map(row)
        .collect()
}

pub fn row(v: &SiteVerdict) -> Row {
    let values: Vec<f64> = v.samples.iter().map(|s: &HistorySample| s.value).collect();
    Row {
        key: row_key(v),
        verdict: v.verdict,
        verdict_text: verdict_text(v.verdict),
        kind: v.kind.as_str(),
        pid: v.pid.to_string(),
        current: amount(v.kind, v.current),
        growth_per_minute: signed(v.kind, v.growth_per_second * 60.0),
        // Nothing alive has no oldest.
        oldest: match v.oldest_alive_seconds {
            Some(age) if v.current > 0.0 => duration(age),
            _ => "-".to_string(),
        },
        trend: sparkline(&values, SPARK_WIDTH),
        site: v.site.clone(),
    }
}

/// `1234`, `12.3k`, `4.5M`: a count of tasks (fractions shown below 10).
pub fn count(n: f64) -> String {
    let a = n.abs();
    if (a * 10.0).round() == 0.0 {
        "0".to_string()
    } else if a < 10.0 && n.fract() != 0.0 {
        format!("{n:.1}")
    } else if a < 10_000.0 {
        format!("{n:.0}")
    } else if a < 10_000_000.0 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{:.1}M", n / 1e6)
    }
}

/// Alive tasks (task sites) or live bytes (heap sites).
pub fn amount(kind: SiteKind, n: f64) -> String {
    match kind {
        SiteKind::Task => count(n),
        SiteKind::Heap => bytes(n),
    }
}

/// A change with its sign: `+12`, `-3.5`, `+1.2 MiB`, `0`.
pub fn signed(kind: SiteKind, n: f64) -> String {
    // What rounds to zero is shown as zero, without a sign.
    let shown = amount(kind, n.abs());
    if shown == "0" || shown == "0 B" || n == 0.0 {
        shown
    } else if n > 0.0 {
        format!("+{shown}")
    } else {
        format!("-{shown}")
    }
}

/// Levels 0..=7 for `values` squeezed into at most `width` buckets (each the mean of its
/// samples, oldest first), scaled from the smallest to the largest: a flat series is all 0.
pub fn spark_levels(values: &[f64], width: usize) -> Vec<u8> {
    if values.is_empty() || width == 0 {
        return Vec::new();
    }
    let buckets = values.len().min(width);
    let means: Vec<f64> = (0..buckets)
        .map(|b| {
            let (start, end) = (b * values.len() / buckets, (b + 1) * values.len() / buckets);
            let slice = &values[start..end];
            slice.iter().sum::<f64>() / slice.len() as f64
        })
        .collect();
    let min = means.iter().copied().fold(f64::INFINITY, f64::min);
    let max = means.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    means
        .iter()
        .map(|&m| {
            if max > min {
                ((m - min) / (max - min) * 7.0).round() as u8
            } else {
                0
            }
        })
        .collect()
}

/// The trend as block characters, `▁` lowest to `█` highest.
pub fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    spark_levels(values, width)
        .into_iter()
        .map(|l| BARS[l as usize])
        .collect()
}

/// How many sites there are and how many are suspects.
pub fn counts(verdicts: &VerdictsResponse) -> (usize, usize) {
    let suspects = verdicts
        .sites
        .iter()
        .filter(|v| v.verdict == Verdict::Suspect)
        .count();
    (verdicts.sites.len(), suspects)
}

#[cfg(test)]
pub(super) mod tests;

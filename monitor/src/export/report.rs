//! The text of `leakscope report`: suspects ranked by score, each with its evidence and its
//! remedy, then a one-line summary of everything else.

use std::fmt::Write as _;

use leakscope_api::types::{Verdict, VerdictsResponse};

/// The report as printed.
pub fn render(verdicts: &VerdictsResponse) -> String {
    let mut out = String::new();
    let suspects: Vec<_> = verdicts
        .sites
        .iter()
        .filter(|v| v.verdict == Verdict::Suspect)
        .collect();
    let count = |verdict: Verdict| {
        verdicts
            .sites
            .iter()
            .filter(|v| v.verdict == verdict)
            .count()
    };
    if suspects.is_empty() {
        let _ = writeln!(
            out,
            "No leak suspects: {} sites judged over {:.0} s, none grows without bound.",
            count(Verdict::Ok),
            verdicts.window_seconds
        );
    } else {
        let _ = writeln!(
            out,
            "{} leak suspect{} over {:.0} s:\n",
            suspects.len(),
            if suspects.len() == 1 { "" } else { "s" },
            verdicts.window_seconds
        );
        for (rank, v) in suspects.iter().enumerate() {
            let _ = writeln!(
                out,
                "{}. [{} {:.2}] {} (pid {}, {})",
                rank + 1,
                v.kind.as_str(),
                v.score,
                v.site,
                v.pid,
                v.exe
            );
            if let Some(location) = &v.location {
                let _ = writeln!(out, "   at {location}");
            }
            let _ = writeln!(out, "   evidence: {}", v.reason);
            if let Some(remedy) = &v.remedy {
                let _ = writeln!(out, "   remedy:   {remedy}");
            }
            out.push('\n');
        }
    }
    let mut before: Vec<_> = verdicts
        .sites
        .iter()
        .filter(|v| v.alive_before_attach > 0)
        .collect();
    if !before.is_empty() {
        before.sort_by_key(|v| std::cmp::Reverse(v.alive_before_attach));
        let _ = writeln!(
            out,
            "Tasks alive since before leakscope attached (task census; ages are lower bounds):"
        );
        for v in before {
            let _ = writeln!(
                out,
                "  {:>8}  {} (pid {}, {}), alive for at least {:.0} s",
                v.alive_before_attach,
                v.site,
                v.pid,
                v.exe,
                v.oldest_alive_seconds.unwrap_or(0.0)
            );
        }
        out.push('\n');
    }
    let (warming, cannot) = (count(Verdict::WarmingUp), count(Verdict::CannotJudge));
    if warming + cannot > 0 {
        let _ = writeln!(
            out,
            "Not judged: {warming} sites seen too briefly, {cannot} sites whose completions \
             leakscope cannot observe."
        );
    }
    if verdicts.sites_dropped > 0 {
        let _ = writeln!(
            out,
            "{} sites were not tracked (site limit reached).",
            verdicts.sites_dropped
        );
    }
    out
}

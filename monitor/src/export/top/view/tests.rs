use leakscope_api::types::{HistorySample, SiteKind, SiteVerdict, Verdict, VerdictsResponse};

use super::*;

/// A task site of pid 7 with a rising history.
pub fn site(name: &str, verdict: Verdict, score: f64, growth: f64, current: f64) -> SiteVerdict {
    SiteVerdict {
        labels: Default::default(),
        pid: 7,
        exe: "/bin/app".into(),
        kind: SiteKind::Task,
        site: name.into(),
        location: None,
        verdict,
        score,
        pattern: None,
        reason: format!("{name} reason"),
        remedy: (verdict == Verdict::Suspect).then(|| format!("{name} remedy")),
        growth_per_second: growth,
        current,
        oldest_alive_seconds: Some(95.0),
        alive_before_attach: 0,
        suspect_since: None,
        samples: (0..5)
            .map(|i| HistorySample {
                t: i as f64,
                value: current - growth * (4 - i) as f64,
            })
            .collect(),
    }
}

pub fn verdicts(sites: Vec<SiteVerdict>) -> VerdictsResponse {
    VerdictsResponse {
        window_seconds: 10.0,
        sample_seconds: 1.0,
        sites,
        sites_dropped: 0,
    }
}

fn mixed() -> VerdictsResponse {
    let mut heap = site(
        "app::cache_insert",
        Verdict::Suspect,
        0.5,
        4096.0,
        3.0 * 1048576.0,
    );
    heap.kind = SiteKind::Heap;
    heap.oldest_alive_seconds = None;
    verdicts(vec![
        site("app::ok_bounded", Verdict::Ok, 0.0, 0.0, 5.0),
        site("app::leak_forever", Verdict::Suspect, 0.9, 2.0, 100.0),
        site("app::worker", Verdict::WarmingUp, 0.0, 0.5, 50.0),
        site("app::stuck", Verdict::CannotJudge, 0.0, 0.1, 1.0),
        heap,
    ])
}

fn names(v: &VerdictsResponse, sort: SortKey, filter: &str) -> Vec<String> {
    rows(v, sort, filter).into_iter().map(|r| r.site).collect()
}

#[test]
fn sorts_by_each_key() {
    let v = mixed();
    assert_eq!(
        names(&v, SortKey::Score, ""),
        [
            "app::leak_forever",
            "app::cache_insert",
            // Unscored: what cannot be judged, then what is warming up, then ok.
            "app::stuck",
            "app::worker",
            "app::ok_bounded"
        ]
    );
    assert_eq!(
        names(&v, SortKey::Growth, ""),
        [
            "app::cache_insert",
            "app::leak_forever",
            "app::worker",
            "app::stuck",
            "app::ok_bounded"
        ]
    );
    assert_eq!(
        names(&v, SortKey::Current, "")[..2],
        ["app::cache_insert", "app::leak_forever"]
    );
    assert_eq!(
        names(&v, SortKey::Name, ""),
        [
            "app::cache_insert",
            "app::leak_forever",
            "app::ok_bounded",
            "app::stuck",
            "app::worker"
        ]
    );
    let mut key = SortKey::default();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(key.label());
        key = key.next();
    }
    assert_eq!(seen, ["score", "growth", "current", "name"]);
    assert_eq!(key, SortKey::Score);
}

#[test]
fn filters_on_the_site_name_ignoring_case() {
    let v = mixed();
    assert_eq!(names(&v, SortKey::Score, "LEAK_"), ["app::leak_forever"]);
    assert_eq!(names(&v, SortKey::Name, "o").len(), 3);
    assert!(names(&v, SortKey::Score, "nothing like it").is_empty());
    assert_eq!(names(&v, SortKey::Score, "").len(), 5);
}

#[test]
fn rows_show_each_kind_in_its_unit() {
    let v = mixed();
    let rows = rows(&v, SortKey::Score, "");
    let task = &rows[0];
    assert_eq!(
        (
            task.verdict_text,
            task.kind,
            task.pid.as_str(),
            task.current.as_str(),
            task.growth_per_minute.as_str(),
            task.oldest.as_str(),
        ),
        ("SUSPECT", "task", "7", "100", "+120", "95 s")
    );
    assert_eq!(task.trend, "▁▃▅▆█");
    let heap = &rows[1];
    assert_eq!(
        (
            heap.kind,
            heap.current.as_str(),
            heap.growth_per_minute.as_str(),
            heap.oldest.as_str()
        ),
        ("heap", "3.0 MiB", "+240.0 KiB", "-")
    );
    let ok = rows.last().unwrap();
    assert_eq!(
        (ok.verdict_text, ok.growth_per_minute.as_str()),
        ("ok", "0")
    );
    assert_eq!(ok.trend, "▁▁▁▁▁");
    assert_eq!(counts(&v), (5, 2));
    // Nothing alive: no oldest age.
    let idle = row(&site("app::idle", Verdict::Ok, 0.0, 0.0, 0.0));
    assert_eq!((idle.current.as_str(), idle.oldest.as_str()), ("0", "-"));
}

#[test]
fn numbers_read_at_a_glance() {
    assert_eq!(count(0.0), "0");
    assert_eq!(count(0.04), "0");
    assert_eq!(count(3.57), "3.6");
    assert_eq!(count(7.0), "7");
    assert_eq!(count(214.2), "214");
    assert_eq!(count(9999.0), "9999");
    assert_eq!(count(12_345.0), "12.3k");
    assert_eq!(count(45_000_000.0), "45.0M");
    assert_eq!(signed(SiteKind::Task, -3.5), "-3.5");
    assert_eq!(signed(SiteKind::Task, 0.01), "0");
    assert_eq!(signed(SiteKind::Heap, 0.2), "0 B");
    assert_eq!(signed(SiteKind::Heap, 2048.0), "+2.0 KiB");
    assert_eq!(signed(SiteKind::Heap, -512.0), "-512 B");
    assert_eq!(amount(SiteKind::Heap, 1536.0), "1.5 KiB");
}

#[test]
fn sparkline_scales_from_lowest_to_highest_and_fits_its_width() {
    assert_eq!(sparkline(&[], 10), "");
    assert_eq!(sparkline(&[3.0], 10), "▁");
    assert_eq!(sparkline(&[0.0, 7.0], 10), "▁█");
    assert_eq!(spark_levels(&[5.0, 5.0, 5.0], 10), [0, 0, 0]);
    assert_eq!(spark_levels(&[10.0, 0.0, 5.0], 10), [7, 0, 4]);
    // 100 samples into 10 buckets, each the mean of 10: a straight rise stays straight.
    let rising: Vec<f64> = (0..100).map(f64::from).collect();
    let levels = spark_levels(&rising, 10);
    assert_eq!(levels.len(), 10);
    assert_eq!((levels[0], levels[9]), (0, 7));
    assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
    assert_eq!(sparkline(&rising, SPARK_WIDTH).chars().count(), SPARK_WIDTH);
    assert!(sparkline(&[1.0, 2.0], 0).is_empty());
}

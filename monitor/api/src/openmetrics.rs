//! The `/metrics` text (OpenMetrics or Prometheus exposition) as samples.

use std::collections::BTreeMap;

/// One sample: its family name (with `_total` for counters), labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// Parses every sample line; comments and malformed lines are skipped. Label values may
/// hold escaped quotes and backslashes.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, mut rest) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut labels = BTreeMap::new();
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut label = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => label.push('\n'),
                    c => label.push(c),
                },
                (i, '"') => break i,
                (_, c) => label.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_string(), label);
        rest = &after[end + 1..];
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Sum of `family`'s samples whose labels include every `(key, value)` of `matching`.
pub fn sum(samples: &[Sample], family: &str, matching: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == family && matching.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labelled_and_plain_samples() {
        let samples = parse(
            "# TYPE x gauge\n\
             leakscope_tasks_alive{pid=\"1\",exe=\"a\",site=\"m::f::{{closure}}\"} 3\n\
             leakscope_tasks_alive{pid=\"2\",exe=\"a\",site=\"m::f::{{closure}}\"} 4\n\
             leakscope_events_total 5\n# EOF\n",
        );
        assert_eq!(samples.len(), 3);
        let site = ("site", "m::f::{{closure}}");
        assert_eq!(
            sum(&samples, "leakscope_tasks_alive", &[("pid", "1"), site]),
            3.0
        );
        assert_eq!(sum(&samples, "leakscope_tasks_alive", &[site]), 7.0);
        assert_eq!(sum(&samples, "leakscope_events_total", &[]), 5.0);
    }

    #[test]
    fn unescapes_label_values() {
        let samples = parse("f{site=\"a \\\"quoted\\\" \\\\ b\",pid=\"1\"} 1\n");
        assert_eq!(samples[0].label("site"), Some("a \"quoted\" \\ b"));
        assert_eq!(samples[0].label("pid"), Some("1"));
    }
}

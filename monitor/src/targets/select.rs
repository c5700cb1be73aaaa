//! Which of a host's tokio services host-wide mode watches: `--include` and `--exclude`
//! rules, each `KEY=GLOB` on the executable's path or on what the process runs in.
//!
//! A process is watched when it matches some include rule (or there is none) and no
//! exclude rule. Keys: `exe` (the executable's path as the process sees it, so inside a
//! container its path there), `unit` (systemd service), `namespace`, `pod`, `container`
//! (Kubernetes); a process without the property (no unit, not in a pod) matches no rule on
//! it. Globs are shell-like: `*` does not cross `/` in `exe` paths, `**` does.

use globset::{Glob, GlobBuilder, GlobMatcher};
use thiserror::Error;

use super::workload::Workload;

#[derive(Debug, Error, PartialEq)]
pub enum SelectError {
    #[error(
        "{rule:?}: a rule is KEY=GLOB with KEY one of exe, unit, namespace, pod, container \
         (e.g. --exclude namespace=kube-system)"
    )]
    Shape { rule: String },
    #[error("{rule:?}: {reason}")]
    Glob { rule: String, reason: String },
}

/// What a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Exe,
    Unit,
    Namespace,
    Pod,
    Container,
}

impl Key {
    fn parse(key: &str) -> Option<Self> {
        Some(match key {
            "exe" => Self::Exe,
            "unit" => Self::Unit,
            "namespace" => Self::Namespace,
            "pod" => Self::Pod,
            "container" => Self::Container,
            _ => return None,
        })
    }
}

/// One `KEY=GLOB` rule.
#[derive(Debug, Clone)]
pub struct Rule {
    key: Key,
    text: String,
    glob: GlobMatcher,
}

impl Rule {
    pub fn parse(rule: &str) -> Result<Self, SelectError> {
        let shape = || SelectError::Shape {
            rule: rule.to_string(),
        };
        let (key, pattern) = rule.split_once('=').ok_or_else(shape)?;
        let key = Key::parse(key.trim()).ok_or_else(shape)?;
        if pattern.is_empty() {
            return Err(shape());
        }
        let glob = match key {
            Key::Exe => GlobBuilder::new(pattern).literal_separator(true).build(),
            _ => Glob::new(pattern),
        }
        .map_err(|e| SelectError::Glob {
            rule: rule.to_string(),
            reason: e.kind().to_string(),
        })?;
        Ok(Self {
            key,
            text: rule.to_string(),
            glob: glob.compile_matcher(),
        })
    }

    fn matches(&self, exe: &str, workload: &Workload) -> bool {
        let value = match self.key {
            Key::Exe => Some(exe),
            Key::Unit => workload.unit.as_deref(),
            Key::Namespace => workload.namespace.as_deref(),
            Key::Pod => workload.pod.as_deref(),
            Key::Container => workload.container.as_deref(),
        };
        value.is_some_and(|value| self.glob.is_match(value))
    }

    /// True when the rule needs the process's workload (anything but `exe`).
    fn needs_workload(&self) -> bool {
        self.key != Key::Exe
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The include and exclude rules of host-wide mode.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub include: Vec<Rule>,
    pub exclude: Vec<Rule>,
}

impl Selection {
    pub fn parse(include: &[String], exclude: &[String]) -> Result<Self, SelectError> {
        let rules = |texts: &[String]| -> Result<Vec<Rule>, SelectError> {
            texts.iter().map(|t| Rule::parse(t)).collect()
        };
        Ok(Self {
            include: rules(include)?,
            exclude: rules(exclude)?,
        })
    }

    /// True when a rule looks at the workload, which then has to be learned before the
    /// process can be judged.
    pub fn needs_workload(&self) -> bool {
        self.include
            .iter()
            .chain(&self.exclude)
            .any(Rule::needs_workload)
    }

    /// Whether a process running `exe` in `workload` is watched; when not, the rule that
    /// says so (`None` for no include rule matching).
    pub fn admits(&self, exe: &str, workload: &Workload) -> Result<(), Option<&Rule>> {
        if let Some(rule) = self.exclude.iter().find(|r| r.matches(exe, workload)) {
            return Err(Some(rule));
        }
        if !self.include.is_empty() && !self.include.iter().any(|r| r.matches(exe, workload)) {
            return Err(None);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(include: &[&str], exclude: &[&str]) -> Selection {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Selection::parse(&owned(include), &owned(exclude)).unwrap()
    }

    fn pod(namespace: &str) -> Workload {
        Workload {
            namespace: Some(namespace.into()),
            pod: Some("api-1".into()),
            container: Some("api".into()),
            ..Workload::default()
        }
    }

    #[test]
    fn no_rule_admits_everything() {
        assert!(
            select(&[], &[])
                .admits("/srv/a", &Workload::default())
                .is_ok()
        );
    }

    #[test]
    fn exclude_wins_over_include() {
        let s = select(&["exe=/srv/**"], &["namespace=kube-*"]);
        assert!(s.admits("/srv/bin/api", &pod("shop")).is_ok());
        let excluded = s.admits("/srv/bin/api", &pod("kube-system"));
        assert_eq!(
            excluded.unwrap_err().map(|r| r.to_string()).as_deref(),
            Some("namespace=kube-*")
        );
        assert_eq!(
            s.admits("/usr/bin/x", &pod("shop"))
                .unwrap_err()
                .map(|r| r.to_string()),
            None
        );
    }

    #[test]
    fn exe_stars_do_not_cross_slashes_and_missing_properties_match_nothing() {
        let s = select(&["exe=/srv/*"], &[]);
        assert!(s.admits("/srv/api", &Workload::default()).is_ok());
        assert!(s.admits("/srv/bin/api", &Workload::default()).is_err());
        let units = select(&["unit=payments*.service"], &[]);
        assert!(units.admits("/x", &Workload::default()).is_err());
        let unit = Workload {
            unit: Some("payments-v2.service".into()),
            ..Workload::default()
        };
        assert!(units.admits("/x", &unit).is_ok());
        assert!(units.needs_workload());
        assert!(!s.needs_workload());
    }

    #[test]
    fn bad_rules_say_what_a_rule_is() {
        for bad in ["exe", "image=nginx", "pod=", "exe=/srv/[a"] {
            let err = Rule::parse(bad).unwrap_err();
            assert!(err.to_string().starts_with(&format!("{bad:?}: ")), "{err}");
        }
    }
}

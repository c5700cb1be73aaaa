//! Functions looked up by name, in time independent of how many the binary has.
//!
//! Naming a vtable can ask for "the function called X" once per vtable; scanning every
//! symbol each time (and stripping generics from each name on the way) made the analysis
//! quadratic in the number of spawn sites: seconds on a 50 MB service. The index is built
//! once per image, on first use, and holds only hashes and addresses (16 bytes per name
//! and spelling), not the names: a lookup confirms its hits against the names themselves,
//! so a hash collision costs a comparison, never a wrong answer.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use super::elf::FnInfo;
use super::naming;

/// Function starts by the hash of each of their names, exact and without generics.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameIndex {
    /// (hash of a name, function start), sorted.
    exact: Vec<(u64, u64)>,
    /// (hash of a name without generics ([`naming::strip_generics`]), function start),
    /// sorted.
    bare: Vec<(u64, u64)>,
}

fn hash(name: &str) -> u64 {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

/// The starts recorded under `key`, ascending.
fn starts(entries: &[(u64, u64)], key: u64) -> impl Iterator<Item = u64> + '_ {
    let from = entries.partition_point(|&(h, _)| h < key);
    entries[from..]
        .iter()
        .take_while(move |&&(h, _)| h == key)
        .map(|&(_, start)| start)
}

impl NameIndex {
    pub fn build(functions: &BTreeMap<u64, FnInfo>) -> Self {
        let mut exact = Vec::new();
        let mut bare = Vec::new();
        for (&start, f) in functions {
            for name in &f.names {
                exact.push((hash(name), start));
                bare.push((hash(&naming::strip_generics(name)), start));
            }
        }
        for v in [&mut exact, &mut bare] {
            v.sort_unstable();
            v.dedup();
        }
        Self { exact, bare }
    }

    /// Starts of the functions one of whose names is `name`, ascending.
    pub fn named(&self, functions: &BTreeMap<u64, FnInfo>, name: &str) -> Vec<u64> {
        starts(&self.exact, hash(name))
            .filter(|start| functions[start].names.iter().any(|n| n == name))
            .collect()
    }

    /// Starts of the functions one of whose names is `path` once generic arguments are
    /// stripped ([`naming::strip_generics`]), ascending.
    pub fn named_without_generics(
        &self,
        functions: &BTreeMap<u64, FnInfo>,
        path: &str,
    ) -> Vec<u64> {
        starts(&self.bare, hash(path))
            .filter(|start| {
                functions[start]
                    .names
                    .iter()
                    .any(|n| naming::strip_generics(n) == path)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn functions(names: &[(u64, &[&str])]) -> BTreeMap<u64, FnInfo> {
        names
            .iter()
            .map(|&(start, names)| {
                (
                    start,
                    FnInfo {
                        size: 0,
                        names: names.iter().map(|n| n.to_string()).collect(),
                    },
                )
            })
            .collect()
    }

    /// What the index answers is what a scan of every name answers.
    #[test]
    fn answers_as_a_scan_does() {
        let f = functions(&[
            (0x30, &["a::f<T>", "b::g"]),
            (0x10, &["a::f<U>"]),
            (0x20, &["<a::S<X>>::m", "a::f<T>"]),
        ]);
        let index = NameIndex::build(&f);
        let scan = |pred: &dyn Fn(&str) -> bool| -> Vec<u64> {
            f.iter()
                .filter(|(_, i)| i.names.iter().any(|n| pred(n)))
                .map(|(&a, _)| a)
                .collect()
        };
        for name in ["a::f<T>", "a::f<U>", "b::g", "a::f", "a::S::m", "nothing"] {
            assert_eq!(index.named(&f, name), scan(&|n| n == name), "{name}");
            assert_eq!(
                index.named_without_generics(&f, name),
                scan(&|n| naming::strip_generics(n) == name),
                "{name}"
            );
        }
        assert_eq!(index.named_without_generics(&f, "a::f"), [0x10, 0x20, 0x30]);
    }
}

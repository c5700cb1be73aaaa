//! Bounded labels: a table of distinct keys (spawn sites, heap callsites) that stops growing
//! at a limit. Keys beyond it share one overflow key, and every such fold is counted, so a
//! series' cardinality stays bounded and an export can say how much it merged.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
pub struct BoundedLabels<K> {
    keys: Vec<K>,
    index: HashMap<K, usize>,
    max: usize,
    overflow: K,
    /// Lookups of a new key once the table was full: answered with the overflow key.
    pub folded: u64,
}

impl<K: Clone + Eq + Hash> BoundedLabels<K> {
    /// A table of at most `max` keys plus `overflow`.
    pub fn new(max: usize, overflow: K) -> Self {
        Self {
            keys: Vec::new(),
            index: HashMap::new(),
            max,
            overflow,
            folded: 0,
        }
    }

    /// The index of `key`, added if there is room; the overflow key's index if not.
    /// Indexes are dense and stable: a caller may keep figures in a `Vec` beside the table.
    pub fn intern(&mut self, key: K) -> usize {
        if let Some(&index) = self.index.get(&key) {
            return index;
        }
        let key = if self.keys.len() >= self.max {
            self.folded += 1;
            match self.index.get(&self.overflow) {
                Some(&index) => return index,
                None => self.overflow.clone(),
            }
        } else {
            key
        };
        self.keys.push(key.clone());
        self.index.insert(key, self.keys.len() - 1);
        self.keys.len() - 1
    }

    pub fn get(&self, index: usize) -> &K {
        &self.keys[index]
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_beyond_the_bound_share_the_overflow_key_and_are_counted() {
        let mut labels = BoundedLabels::new(2, "other");
        assert_eq!(labels.intern("a"), 0);
        assert_eq!(labels.intern("b"), 1);
        assert_eq!(labels.intern("a"), 0);
        let c = labels.intern("c");
        assert_eq!(labels.get(c), &"other");
        assert_eq!(labels.intern("d"), c);
        // Known keys still find their own index once full.
        assert_eq!(labels.intern("b"), 1);
        assert_eq!((labels.len(), labels.folded), (3, 2));
    }
}

//! Each site's recent samples, bounded: a window's worth per site, and a cap on the sites
//! tracked at once (beyond it, new sites are counted, not tracked).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// One observation of a site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the analysis started.
    pub t: f64,
    /// Alive tasks, or live bytes.
    pub value: f64,
    /// Task sites: spawned and completed since attach (cumulative); 0 for heap sites.
    pub spawned: u64,
    pub completed: u64,
}

/// Samples per site, oldest first, none older than the window.
#[derive(Debug)]
pub struct Histories<K> {
    sites: HashMap<K, VecDeque<Sample>>,
    window: f64,
    per_site: usize,
    max_sites: usize,
    /// New sites not tracked because `max_sites` were tracked already.
    pub dropped: u64,
}

impl<K: Clone + Eq + Hash> Histories<K> {
    /// Keeps `window` seconds of samples taken every `period` seconds, for at most
    /// `max_sites` sites.
    pub fn new(window: f64, period: f64, max_sites: usize) -> Self {
        Self {
            sites: HashMap::new(),
            window,
            per_site: (window / period).ceil() as usize + 2,
            max_sites,
            dropped: 0,
        }
    }

    /// Adds a sample of `key`; false when the site is new and the bound is reached.
    pub fn push(&mut self, key: &K, sample: Sample) -> bool {
        if !self.sites.contains_key(key) {
            if self.sites.len() >= self.max_sites {
                self.dropped += 1;
                return false;
            }
            self.sites.insert(key.clone(), VecDeque::new());
        }
        let samples = self.sites.get_mut(key).expect("inserted above");
        samples.push_back(sample);
        while samples.len() > self.per_site
            || samples
                .front()
                .is_some_and(|s| sample.t - s.t > self.window + 1e-9)
        {
            samples.pop_front();
        }
        true
    }

    pub fn get(&self, key: &K) -> Option<&VecDeque<Sample>> {
        self.sites.get(key)
    }

    /// Forgets sites for which `keep` is false (their process exited).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.sites.retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Samples held, all sites together.
    pub fn samples(&self) -> usize {
        self.sites.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: f64) -> Sample {
        Sample {
            t,
            value: t,
            spawned: 0,
            completed: 0,
        }
    }

    #[test]
    fn keeps_a_window_per_site_and_counts_sites_beyond_the_bound() {
        let mut h = Histories::new(10.0, 1.0, 2);
        for t in 0..30 {
            assert!(h.push(&"a", at(f64::from(t))));
        }
        let a = h.get(&"a").unwrap();
        assert_eq!((a.front().unwrap().t, a.back().unwrap().t), (19.0, 29.0));
        assert!(h.push(&"b", at(0.0)));
        assert!(!h.push(&"c", at(0.0)));
        assert_eq!((h.len(), h.dropped), (2, 1));
        h.retain(|k| *k != "a");
        assert!(h.push(&"c", at(0.0)));
        assert_eq!(h.samples(), 2);
    }
}

//! Health of one event stream (the task ring or the heap ring): how many events arrived,
//! how many the kernel numbered but userspace never received, how many were not counted.
//!
//! Each BPF program numbers its events per CPU, so a gap in one CPU's sequence is exactly
//! the number of events lost there (ring buffer full, or a record dropped).

use std::collections::HashMap;

pub use leakscope_api::types::StreamStats;

/// One stream's counters and the last sequence number seen on each CPU.
#[derive(Debug, Default)]
pub struct EventStream {
    pub stats: StreamStats,
    last_seq_by_cpu: HashMap<u32, u64>,
}

impl EventStream {
    /// Counts one received event numbered `seq` on `cpu`, and the events lost before it.
    ///
    /// The counters saturate: a record the kernel did not write as ours (or a corrupted
    /// one) can carry any number, and must cost a wrong count, not a panic or a wrap.
    pub fn receive(&mut self, cpu: u32, seq: u64) {
        self.stats.events = self.stats.events.saturating_add(1);
        if let Some(last) = self.last_seq_by_cpu.insert(cpu, seq)
            && seq > last.saturating_add(1)
        {
            self.stats.lost = self.stats.lost.saturating_add(seq - last - 1);
        }
    }

    /// Counts an event that was received but not counted anywhere.
    pub fn ignore(&mut self, events: u64) {
        self.stats.ignored = self.stats.ignored.saturating_add(events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_per_cpu_count_as_lost() {
        let mut stream = EventStream::default();
        stream.receive(0, 1);
        stream.receive(1, 1);
        stream.receive(0, 5);
        stream.receive(1, 2);
        assert_eq!(
            stream.stats,
            StreamStats {
                events: 4,
                lost: 3,
                ignored: 0
            }
        );
    }

    /// Found by fuzzing (ring_events): a record numbered u64::MAX overflowed the next gap's
    /// `last + 1`, and gaps that large overflowed the lost count.
    #[test]
    fn extreme_sequence_numbers_saturate() {
        let mut stream = EventStream::default();
        stream.receive(0, u64::MAX);
        stream.receive(0, 3);
        assert_eq!(stream.stats.lost, 0);
        stream.receive(1, 0);
        stream.receive(1, u64::MAX);
        stream.receive(1, 0);
        stream.receive(1, u64::MAX);
        assert_eq!(stream.stats.lost, u64::MAX);
        assert_eq!(stream.stats.events, 6);
    }
}

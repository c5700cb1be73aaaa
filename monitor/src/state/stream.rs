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
    pub fn receive(&mut self, cpu: u32, seq: u64) {
        self.stats.events += 1;
        if let Some(last) = self.last_seq_by_cpu.insert(cpu, seq)
            && seq > last + 1
        {
            self.stats.lost += seq - last - 1;
        }
    }

    /// Counts an event that was received but not counted anywhere.
    pub fn ignore(&mut self, events: u64) {
        self.stats.ignored += events;
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
}

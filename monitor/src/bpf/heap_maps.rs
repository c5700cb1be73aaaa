//! Heap tracking's kernel maps as userspace writes them: each executable's unwind table and
//! bucket index, each process's settings, and the purge of a process's outstanding blocks.

use monitor_common::heap::{BLOCK_FREED, BlockInfo, BlockKey, HeapTarget, tombstones};
use monitor_common::names::map;
use monitor_common::unwind::UnwindRow;

use super::loader::{ProbeError, Probes};

impl Probes {
    /// Copies an executable's unwind table into the kernel at `first`.
    pub fn load_unwind_rows(&mut self, first: u32, rows: &[UnwindRow]) -> Result<(), ProbeError> {
        self.fill_array(map::UNWIND_ROWS, first, rows)
    }

    /// Writes an unwind table's bucket index into `UNWIND_BUCKETS` from index `first` on.
    pub fn load_unwind_buckets(&mut self, first: u32, buckets: &[u32]) -> Result<(), ProbeError> {
        self.fill_array(map::UNWIND_BUCKETS, first, buckets)
    }

    fn fill_array<T: aya::Pod>(
        &mut self,
        name: &'static str,
        first: u32,
        values: &[T],
    ) -> Result<(), ProbeError> {
        let mut array: aya::maps::Array<_, T> = self.map_mut(name)?;
        for (i, value) in values.iter().enumerate() {
            array
                .set(first + i as u32, value, 0)
                .map_err(|source| ProbeError::Map { name, source })?;
        }
        Ok(())
    }

    /// Starts (`Some`) or stops (`None`) heap tracking for `pid`.
    pub fn set_heap_target(
        &mut self,
        pid: u32,
        target: Option<HeapTarget>,
    ) -> Result<(), ProbeError> {
        let mut targets: aya::maps::HashMap<_, u32, HeapTarget> =
            self.map_mut(map::HEAP_TARGETS)?;
        let result = match target {
            Some(t) => targets.insert(pid, t, 0),
            None => targets.remove(&pid),
        };
        result.map_err(|source| ProbeError::Map {
            name: map::HEAP_TARGETS,
            source,
        })
    }

    /// Forgets every block the kernel still tracks for `pid` (it exited or was detached), so
    /// that the bounded map does not fill with the dead and a later process reusing the pid
    /// does not inherit them. Returns how many were dropped. Called once the process is no
    /// longer a heap target, so its probes no longer touch its entries.
    pub fn purge_heap_blocks(&mut self, pid: u32) -> Result<usize, ProbeError> {
        let mut blocks: aya::maps::HashMap<_, BlockKey, BlockInfo> =
            self.map_mut(map::OUTSTANDING)?;
        let stale: Vec<BlockKey> = blocks
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pid == pid)
            .collect();
        let mut purged_tombstones = 0;
        for key in &stale {
            let tombstone = blocks
                .get(key, 0)
                .is_ok_and(|info| info.aggregated == BLOCK_FREED);
            // Gone already (freed meanwhile): nothing to do.
            if blocks.remove(key).is_ok() && tombstone {
                purged_tombstones += 1;
            }
        }
        if purged_tombstones > 0 {
            // Userspace is the only writer of this slot.
            let mut counts: aya::maps::Array<_, u64> = self.map_mut(map::TOMBSTONES)?;
            let purged = counts.get(&tombstones::PURGED, 0).unwrap_or(0);
            counts
                .set(tombstones::PURGED, purged + purged_tombstones, 0)
                .map_err(|source| ProbeError::Map {
                    name: map::TOMBSTONES,
                    source,
                })?;
        }
        Ok(stale.len())
    }
}

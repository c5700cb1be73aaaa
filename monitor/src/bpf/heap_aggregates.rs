//! The kernel's live-heap aggregates (`HEAP_GROUPS`), read by the daemon: every group's
//! running counts, keyed by process, stack (or task cell) and the allocating task's spawn
//! vtable. Read through a handle of its own, so the drain can read while the registry,
//! which owns the probes, attaches and purges.

use aya::maps::{HashMap, Map, MapData};
use monitor_common::heap::{GroupCounters, GroupKey, TaskKey};
use monitor_common::names::map;

use super::loader::{ProbeError, Probes};

/// A reader of `HEAP_GROUPS`.
pub struct HeapAggregates {
    groups: HashMap<MapData, GroupKey, GroupCounters>,
}

fn map_error(source: aya::maps::MapError) -> ProbeError {
    ProbeError::Map {
        name: map::HEAP_GROUPS,
        source,
    }
}

impl HeapAggregates {
    /// Every group's counts now. Each is read at its own moment: a count can run ahead of
    /// another by the allocations and frees made while the map is walked.
    pub fn read(&self) -> Vec<(GroupKey, GroupCounters)> {
        self.groups.iter().filter_map(Result::ok).collect()
    }
}

impl Probes {
    /// A second handle on `HEAP_GROUPS`, for the drain.
    pub fn heap_aggregates(&self) -> Result<HeapAggregates, ProbeError> {
        let Some(Map::HashMap(data)) = self.map(map::HEAP_GROUPS) else {
            return Err(ProbeError::Missing(map::HEAP_GROUPS));
        };
        let id = data.info().map_err(map_error)?.id();
        let own = MapData::from_id(id).map_err(map_error)?;
        let groups = HashMap::try_from(Map::HashMap(own)).map_err(map_error)?;
        Ok(HeapAggregates { groups })
    }

    /// Forgets the groups and task vtables of `pid` (it exited or was detached), so that the
    /// bounded maps do not fill with the dead and a process reusing the pid starts from
    /// nothing (a task id of the dead process must not name a new process's task). Returns
    /// how many groups were dropped.
    pub fn purge_heap_groups(&mut self, pid: u32) -> Result<usize, ProbeError> {
        let mut groups: HashMap<_, GroupKey, GroupCounters> = self.map_mut(map::HEAP_GROUPS)?;
        let stale: Vec<GroupKey> = groups
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pid == pid)
            .collect();
        for key in &stale {
            let _ = groups.remove(key);
        }
        let mut tasks: HashMap<_, TaskKey, u64> = self.map_mut(map::TASK_VTABLES)?;
        let dead: Vec<TaskKey> = tasks
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.pid == pid)
            .collect();
        for key in &dead {
            let _ = tasks.remove(key);
        }
        Ok(stale.len())
    }
}

//! tokio's task layout as one binary has it: which function sits in which entry of the task
//! vtable, whether the record carries the trailer/scheduler/id offsets, and where the task
//! header keeps its vtable pointer. All of it changed across tokio 1.x (1.10: six entries
//! and the owned-list pointers inside the header, vtable at +32; 1.17–1.20: eight entries;
//! 1.23 on: seven entries then three offsets, vtable at +16), so it is learned from the
//! binary (the names of the `raw` functions each record points at, the code that reads the
//! header), never looked up by version. [`TaskLayout`] is the one place that knowledge is
//! kept, for the probes and for anything else that reads tasks in a target's memory.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use super::elf::Image;
use super::naming;

/// Path prefix of the functions a task vtable points at.
const RAW: &str = "tokio::runtime::task::raw::";

/// No tokio 1.x vtable has more entries than this (1.17–1.20: eight).
const MAX_ENTRIES: usize = 12;

/// What the probes and the task readers need to know about a binary's tokio tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskLayout {
    /// Offset of the `&'static Vtable` pointer in a task header.
    pub vtable_offset: u64,
    /// `vtable_offset` was read from the binary's code (true) or is the tokio 1.29–1.54
    /// default of 16 (false).
    pub from_binary: bool,
    /// The vtable record.
    pub vtable: VtableLayout,
}

impl Default for TaskLayout {
    /// The tokio 1.29–1.54 layout, marked as not read from a binary.
    fn default() -> Self {
        TaskLayout {
            vtable_offset: 16,
            from_binary: false,
            vtable: VtableLayout::default(),
        }
    }
}

/// The entries of a task vtable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VtableLayout {
    /// The function entries in record order, each named after the `raw` function it points
    /// at (`poll`, `schedule`, `dealloc`, `shutdown`, ...); `?` where the binary did not say.
    pub entries: Vec<String>,
    /// Three words follow the entries: `trailer_offset`, `scheduler_offset`, `id_offset`
    /// (tokio ≥ 1.23). Older records end with their functions (1.21–1.22 add a trailer
    /// offset, which leakscope does not use), so the task id cannot be found from them.
    pub offsets: bool,
    /// Learned from the binary's symbols (true), or the tokio ≥ 1.23 record assumed and
    /// checked by shape alone (false: a stripped binary).
    pub from_binary: bool,
}

impl Default for VtableLayout {
    /// The tokio ≥ 1.23 record: seven functions, then the three offsets.
    fn default() -> Self {
        VtableLayout {
            entries: [
                "poll",
                "schedule",
                "dealloc",
                "try_read_output",
                "drop_join_handle_slow",
                "drop_abort_handle",
                "shutdown",
            ]
            .map(String::from)
            .to_vec(),
            offsets: true,
            from_binary: false,
        }
    }
}

impl VtableLayout {
    /// Index of the entry pointing at `raw::<name>`.
    pub fn entry(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e == name)
    }

    /// Words of function pointers at the start of the record.
    pub fn fn_words(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Words in the whole record, as far as leakscope reads it.
    pub fn record_words(&self) -> u64 {
        self.fn_words() + if self.offsets { 3 } else { 0 }
    }

    /// Byte position of `id_offset` in the record, when it has one.
    pub fn id_offset_field(&self) -> Option<u64> {
        self.offsets.then(|| 8 * (self.fn_words() + 2))
    }

    /// What this layout cannot tell, for `inspect` and the daemon's log.
    pub fn limits(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.offsets {
            out.push(format!(
                "the task vtable ({} entries: {}) carries no id offset (tokio < 1.23), so task \
                 ids are not read: tasks spawned before attach cannot be told from new ones by \
                 id, and allocations cannot be tied to the task that made them",
                self.entries.len(),
                self.entries.join(", ")
            ));
        }
        if self.entry("schedule").is_none() {
            out.push(
                "the task vtable has no schedule entry (tokio < 1.23): a task's runtime \
                 flavour is read from its cell type only"
                    .to_string(),
            );
        }
        out
    }
}

/// The `raw` function named at `addr` (`poll`, `dealloc`, ...): `None` when `addr` is no
/// such function, `?` when identical code folding gave it several such names.
fn raw_entry(img: &Image, addr: u64) -> Option<String> {
    let mut found: BTreeSet<String> = BTreeSet::new();
    for name in img.names_at(addr) {
        let path = naming::strip_generics(name);
        if let Some(rest) = path.strip_prefix(RAW)
            && !rest.is_empty()
            && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            found.insert(rest.to_string());
        }
    }
    match found.len() {
        0 => None,
        1 => found.pop_first(),
        _ => Some("?".to_string()),
    }
}

/// Learns the vtable record from the binary's symbols: every data word holding a `raw::poll`
/// function starts a record; its entries are the `raw` functions that follow it, named by
/// their symbols, up to the first word that is none (or a second `poll`: the next record).
/// The offsets are present when the three words after the entries are plausible offsets in
/// most records. The records of one binary share one layout; the commonest is taken.
///
/// `Err` says what could not be learned.
pub(crate) fn learn_vtable_layout(
    img: &Image,
    poll_fns: &BTreeSet<u64>,
) -> Result<VtableLayout, String> {
    let mut records: Vec<(Vec<String>, bool)> = Vec::new();
    for (lo, hi) in img.data_ranges() {
        let Some(mut a) = lo.checked_next_multiple_of(8) else {
            continue;
        };
        while a + 8 <= hi && !img.budget.spent() {
            if !img.read_word(a).is_some_and(|w| poll_fns.contains(&w)) {
                a += 8;
                continue;
            }
            let mut entries = vec!["poll".to_string()];
            while entries.len() < MAX_ENTRIES {
                let Some(word) = img.read_word(a + 8 * entries.len() as u64) else {
                    break;
                };
                match img.is_code(word).then(|| raw_entry(img, word)).flatten() {
                    Some(name) if name == "?" || !entries.contains(&name) => entries.push(name),
                    _ => break,
                }
            }
            let base = a + 8 * entries.len() as u64;
            let words: Option<Vec<u64>> = (0..3).map(|i| img.read_word(base + 8 * i)).collect();
            let offsets = words.is_some_and(|w| {
                !w.iter().any(|&x| img.is_code(x))
                    && super::vtables::plausible_offsets(w[0], w[1], w[2])
            });
            a += 8 * entries.len() as u64;
            records.push((entries, offsets));
        }
    }
    if records.is_empty() {
        return Err("no data word points at a tokio::runtime::task::raw::poll function".into());
    }
    let mut by_length: HashMap<usize, u32> = HashMap::new();
    for (entries, _) in &records {
        *by_length.entry(entries.len()).or_default() += 1;
    }
    let (&len, _) = by_length
        .iter()
        .max_by_key(|(len, n)| (**n, std::cmp::Reverse(**len)))
        .expect("records is not empty");
    let same: Vec<&(Vec<String>, bool)> = records.iter().filter(|(e, _)| e.len() == len).collect();
    // Per entry, the name most records of that length agree on (a folded entry says `?`).
    let entries: Vec<String> = (0..len)
        .map(|i| {
            let mut votes: HashMap<&str, u32> = HashMap::new();
            for (e, _) in &same {
                if e[i] != "?" {
                    *votes.entry(e[i].as_str()).or_default() += 1;
                }
            }
            votes
                .into_iter()
                .max_by_key(|(name, n)| (*n, std::cmp::Reverse(*name)))
                .map_or_else(|| "?".to_string(), |(name, _)| name.to_string())
        })
        .collect();
    // Most records, not all: a stray word equal to a `raw::poll` address (a table of fn
    // pointers elsewhere) must not cost every task its id.
    let offsets = 2 * same.iter().filter(|(_, o)| *o).count() > same.len();
    let layout = VtableLayout {
        entries,
        offsets,
        from_binary: true,
    };
    for needed in ["dealloc", "shutdown"] {
        if layout.entry(needed).is_none() {
            return Err(format!(
                "no entry of the task vtable points at raw::{needed} (entries read: {})",
                layout.entries.join(", ")
            ));
        }
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_modern_record_has_its_id_offset_after_seven_functions() {
        let l = VtableLayout::default();
        assert_eq!(l.record_words(), 10);
        assert_eq!(l.id_offset_field(), Some(72));
        assert_eq!(l.entry("shutdown"), Some(6));
        assert!(l.limits().is_empty());
    }

    #[test]
    fn an_old_record_says_what_it_cannot_tell() {
        let l = VtableLayout {
            entries: [
                "poll",
                "dealloc",
                "try_read_output",
                "drop_join_handle_slow",
                "remote_abort",
                "shutdown",
            ]
            .map(String::from)
            .to_vec(),
            offsets: false,
            from_binary: true,
        };
        assert_eq!(l.id_offset_field(), None);
        assert_eq!(l.record_words(), 6);
        assert_eq!(l.limits().len(), 2);
    }
}

//! Distinct values as small ids, shared by every window state of a job.
//!
//! `count(DISTINCT user_id)` keeps, per bucket and group, a count per
//! distinct value. Keyed by the value's row-format bytes (a UUID is ~66 of
//! them, each in its own allocation), every input row cost a hash and a
//! compare through a pointer, in every state counting it: the mission's four
//! KPI windows count the same `user_id` column four times. Here each value
//! is interned once into a `u32`, and the states' maps hold ids.
//!
//! - **One dictionary per job**, shared by all window states
//!   ([`WindowStates`](super::super::windowed::WindowStates) hands it out), so
//!   an id means the same value in every state.
//! - **A memo per input array**: window pre-plans that project the same
//!   column of the same batch hand over the same array, and its ids are
//!   computed once. The memo keeps the arrays it holds alive, so a match by
//!   buffer address can never be a new array at a freed address.
//! - **Garbage collection by mark and sweep**: ids no state holds any more
//!   are freed for reuse once the dictionary has grown to twice what was
//!   live after the last collection. The caller marks every id its states
//!   hold ([`Dictionary::collect`]); nothing else holds ids between batches.
//! - Checkpoints keep writing the values' bytes, not ids: an id is only
//!   meaningful inside one process.

use std::sync::{Arc, Mutex, MutexGuard};

use arrow::array::{Array, ArrayData, ArrayRef};
use arrow::error::ArrowError;
use arrow::row::RowConverter;
use foldhash::HashMap;

use super::WindowState;

/// The id of a NULL that the aggregate does not count (`count(DISTINCT)`
/// ignores NULLs, as SQL says).
pub(super) const NULL_ID: u32 = u32::MAX;

/// Arrays whose ids are remembered: enough for the distinct arguments of
/// one batch's window states.
const MEMO: usize = 4;

/// A collection runs no earlier than this many values, so a small state
/// never spends time collecting.
const COLLECT_FLOOR: usize = 1 << 16;

/// A handle on the job's shared dictionary.
#[derive(Clone, Default)]
pub struct DistinctValues(Arc<Mutex<Dictionary>>);

impl DistinctValues {
    pub(super) fn lock(&self) -> MutexGuard<'_, Dictionary> {
        // A panic while the lock was held leaves a dictionary whose maps are
        // still consistent (each step completes or does not start).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frees the values no state holds any more, once the dictionary has
    /// grown enough since the last time for it to pay. `states` must be
    /// every state sharing this dictionary.
    pub fn collect_unused<'a>(&self, states: impl IntoIterator<Item = &'a WindowState>) {
        let mut dictionary = self.lock();
        if dictionary.wants_collection() {
            dictionary.collect(|mark| states.into_iter().for_each(|s| s.mark_distinct(mark)));
        }
    }
}

#[derive(Default)]
pub(super) struct Dictionary {
    ids: HashMap<Arc<[u8]>, u32>,
    /// By id; `None` for a freed id (listed in `free`).
    values: Vec<Option<Arc<[u8]>>>,
    free: Vec<u32>,
    /// Live values after the last collection.
    live_after_collection: usize,
    memo: Vec<Memo>,
}

struct Memo {
    /// The array's buffers (held, so their addresses stay this array's).
    data: ArrayData,
    keep_nulls: bool,
    ids: Arc<[u32]>,
}

impl Dictionary {
    /// The id of each value of `array` (encoded by `converter`, which takes
    /// that one column). NULLs get [`NULL_ID`] unless `keep_nulls`, when
    /// they are a value like any other (a UDAF sees them).
    pub(super) fn ids(
        &mut self,
        converter: &RowConverter,
        array: &ArrayRef,
        keep_nulls: bool,
    ) -> Result<Arc<[u32]>, ArrowError> {
        let data = array.to_data();
        if let Some(memo) = self
            .memo
            .iter()
            .find(|m| m.keep_nulls == keep_nulls && m.data.ptr_eq(&data))
        {
            return Ok(memo.ids.clone());
        }

        let rows = converter.convert_columns(std::slice::from_ref(array))?;
        let ids: Arc<[u32]> = (0..array.len())
            .map(|row| {
                if !keep_nulls && array.is_null(row) {
                    NULL_ID
                } else {
                    self.intern(rows.row(row).data())
                }
            })
            .collect();
        if self.memo.len() == MEMO {
            self.memo.remove(0);
        }
        self.memo.push(Memo {
            data,
            keep_nulls,
            ids: ids.clone(),
        });
        Ok(ids)
    }

    /// The id of `bytes`, added if new.
    pub(super) fn intern(&mut self, bytes: &[u8]) -> u32 {
        if let Some(&id) = self.ids.get(bytes) {
            return id;
        }
        let value: Arc<[u8]> = bytes.into();
        let id = match self.free.pop() {
            Some(id) => {
                self.values[id as usize] = Some(value.clone());
                id
            }
            None => {
                self.values.push(Some(value.clone()));
                u32::try_from(self.values.len() - 1)
                    .ok()
                    .filter(|&id| id != NULL_ID)
                    .expect("fewer than 2^32 - 1 distinct values held in windows at once")
            }
        };
        self.ids.insert(value, id);
        id
    }

    /// The bytes of a live id.
    pub(super) fn value(&self, id: u32) -> &[u8] {
        self.values[id as usize]
            .as_deref()
            .expect("an id held by a window state is live")
    }

    /// Values held, live or not yet collected.
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the dictionary has grown enough since the last collection
    /// for [`Dictionary::collect`] to pay.
    fn wants_collection(&self) -> bool {
        self.len() >= COLLECT_FLOOR && self.len() >= 2 * self.live_after_collection
    }

    /// Frees every id `mark` does not report. `mark` must report every id
    /// any state sharing this dictionary holds; the memo is dropped, since
    /// its ids are not marked.
    pub(super) fn collect(&mut self, mark: impl FnOnce(&mut dyn FnMut(u32))) {
        self.memo.clear();
        let mut live = vec![false; self.values.len()];
        mark(&mut |id| live[id as usize] = true);
        for (id, slot) in self.values.iter_mut().enumerate() {
            if live[id] {
                continue;
            }
            if let Some(value) = slot.take() {
                self.ids.remove(&value);
                self.free.push(id as u32);
            }
        }
        self.live_after_collection = self.ids.len();
    }

    #[cfg(test)]
    pub(super) fn memo_arrays(&self) -> usize {
        self.memo.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::DataType;
    use arrow::row::SortField;

    fn converter() -> RowConverter {
        RowConverter::new(vec![SortField::new(DataType::Utf8)]).unwrap()
    }

    #[test]
    fn the_same_array_is_converted_once_and_nulls_are_kept_apart() {
        let mut dictionary = Dictionary::default();
        let users: ArrayRef = Arc::new(StringArray::from(vec![Some("u1"), None, Some("u1")]));
        let ids = dictionary.ids(&converter(), &users, false).unwrap();
        assert_eq!(ids[0], ids[2]);
        assert_eq!(ids[1], NULL_ID);
        let again = dictionary.ids(&converter(), &users.clone(), false).unwrap();
        assert!(Arc::ptr_eq(&ids, &again), "a second state reuses the ids");
        assert_eq!(dictionary.memo_arrays(), 1);
        // A UDAF sees NULL as a value: it gets an id of its own.
        let with_nulls = dictionary.ids(&converter(), &users, true).unwrap();
        assert_ne!(with_nulls[1], NULL_ID);
        assert_eq!(with_nulls[0], ids[0]);
        // An equal array in other buffers gets the same ids.
        let copy: ArrayRef = Arc::new(StringArray::from(vec![Some("u1"), None, Some("u1")]));
        assert_eq!(&*dictionary.ids(&converter(), &copy, false).unwrap(), &*ids);
    }

    #[test]
    fn collection_frees_only_unmarked_ids_and_reuses_them() {
        let mut dictionary = Dictionary::default();
        let a = dictionary.intern(b"a");
        let b = dictionary.intern(b"b");
        dictionary.collect(|mark| mark(a));
        assert_eq!(dictionary.len(), 1);
        assert_eq!(dictionary.value(a), b"a");
        let c = dictionary.intern(b"c");
        assert_eq!(c, b, "a freed id is reused");
        assert_eq!(dictionary.value(c), b"c");
        assert_eq!(dictionary.intern(b"a"), a);
    }
}

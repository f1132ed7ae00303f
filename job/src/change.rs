//! The vocabulary every part of engage shares about a change: where it is in
//! its stream ([`Position`]), what it does ([`Op`]), and the metadata columns
//! every change batch carries after the table's own columns.
//!
//! Sources produce these, the engine orders and filters by them, sinks store
//! positions to skip what they hold, and checkpoints record them. Keeping them
//! here, apart from any one of those, is what lets each depend on this module
//! alone rather than on each other.

use std::fmt;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::{lexsort_to_indices, take_record_batch, SortColumn};
use arrow::datatypes::{DataType, Field, Int64Type, TimeUnit};
use arrow::error::ArrowError;
use serde::{Deserialize, Serialize};

/// Change operation column: `c` (insert), `u` (update) or `d` (delete), Debezium's letters.
pub const OP_COLUMN: &str = "_op";
/// Commit LSN of the change's transaction, as a signed 64-bit integer (BigQuery has no UINT64).
pub const LSN_COLUMN: &str = "_lsn";
/// Index of the change within its transaction, from 0.
pub const SEQ_COLUMN: &str = "_seq";
/// Commit time of the change's transaction (UTC, microseconds).
pub const COMMIT_TS_COLUMN: &str = "_commit_ts";

/// The kind of change, written to `_op` with Debezium's letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// A row read by a backfill (`engage backfill`), not a change the
    /// stream delivered: it exists, as it stands when the backfill read it.
    Read,
}

impl Op {
    pub fn letter(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
        }
    }
}

/// The metadata fields appended to every CDC table's declared columns, in order.
pub fn metadata_fields() -> Vec<Field> {
    vec![
        Field::new(OP_COLUMN, DataType::Utf8, false),
        Field::new(LSN_COLUMN, DataType::Int64, false),
        Field::new(SEQ_COLUMN, DataType::Int64, false),
        Field::new(
            COMMIT_TS_COLUMN,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]
}

/// A change's place in the source stream. Ordered: commit LSN first, then the
/// index within the transaction.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Commit LSN of the transaction (0 means "before everything").
    pub lsn: u64,
    /// Index of the change within its transaction.
    pub seq: u64,
}

impl Position {
    /// The position before any change.
    pub const ZERO: Position = Position { lsn: 0, seq: 0 };

    pub fn new(lsn: u64, seq: u64) -> Self {
        Position { lsn, seq }
    }

    /// Fixed-width text form (`LLLLLLLLLLLLLLLL/SSSSSSSSSSSSSSSS`, hex) whose
    /// byte order equals the position order; used where positions are compared
    /// as strings (Redis Lua scripts).
    pub fn to_sortable(self) -> String {
        format!("{:016X}/{:016X}", self.lsn, self.seq)
    }

    /// [`Position::to_sortable`] in a fixed array, without allocating (for
    /// per-message headers).
    pub fn sortable_bytes(self) -> [u8; 33] {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = [b'/'; 33];
        for i in 0..16 {
            let shift = 60 - 4 * i;
            out[i] = HEX[((self.lsn >> shift) & 0xF) as usize];
            out[17 + i] = HEX[((self.seq >> shift) & 0xF) as usize];
        }
        out
    }

    pub fn from_sortable(text: &str) -> Option<Position> {
        let (lsn, seq) = text.split_once('/')?;
        Some(Position {
            lsn: u64::from_str_radix(lsn, 16).ok()?,
            seq: u64::from_str_radix(seq, 16).ok()?,
        })
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", format_lsn(self.lsn), self.seq)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `batch` with its rows in position order (`_lsn`, then `_seq`): as it is
/// when they are already, or when it lacks those columns. A query's output
/// need not keep its input's order (a hash join may permute a batch), while
/// the engine's position filters and the sinks rely on it.
pub fn in_position_order(batch: RecordBatch) -> Result<RecordBatch, ArrowError> {
    let (Some(lsn), Some(seq)) = (
        batch.column_by_name(LSN_COLUMN).cloned(),
        batch.column_by_name(SEQ_COLUMN).cloned(),
    ) else {
        return Ok(batch);
    };
    let (Some(lsns), Some(seqs)) = (
        lsn.as_primitive_opt::<Int64Type>(),
        seq.as_primitive_opt::<Int64Type>(),
    ) else {
        return Ok(batch);
    };
    let key = |row: usize| (lsns.value(row), seqs.value(row));
    if (1..batch.num_rows()).all(|row| key(row - 1) <= key(row)) {
        return Ok(batch);
    }
    let columns = [
        SortColumn {
            values: lsn.clone(),
            options: None,
        },
        SortColumn {
            values: seq.clone(),
            options: None,
        },
    ];
    let order = lexsort_to_indices(&columns, None)?;
    take_record_batch(&batch, &order)
}

/// Postgres' text form of an LSN: `16B3/748` (two hex halves).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses Postgres' text form of an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sortable_text_orders_like_positions() {
        let a = Position::new(0x1_0000_0000, 5);
        let b = Position::new(0x1_0000_0001, 0);
        assert!(a < b);
        assert!(a.to_sortable() < b.to_sortable());
        assert_eq!(Position::from_sortable(&a.to_sortable()), Some(a));
        for p in [a, b, Position::ZERO, Position::new(u64::MAX, 0xABC)] {
            assert_eq!(p.sortable_bytes(), p.to_sortable().as_bytes());
        }
    }

    #[test]
    fn batches_are_put_in_position_order_and_left_alone_when_they_are() {
        use arrow::array::Int64Array;
        use std::sync::Arc;
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(LSN_COLUMN, DataType::Int64, false),
            Field::new(SEQ_COLUMN, DataType::Int64, false),
        ]));
        let batch = |ids: Vec<i64>, lsns: Vec<i64>, seqs: Vec<i64>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(ids)),
                    Arc::new(Int64Array::from(lsns)),
                    Arc::new(Int64Array::from(seqs)),
                ],
            )
            .unwrap()
        };
        let sorted = in_position_order(batch(vec![1, 2, 3], vec![9, 5, 5], vec![0, 1, 0])).unwrap();
        let ids = sorted.column(0).as_primitive::<Int64Type>();
        assert_eq!(ids.values(), &[3, 2, 1]);
        let already = batch(vec![1, 2], vec![5, 5], vec![0, 1]);
        assert_eq!(in_position_order(already.clone()).unwrap(), already);
    }

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(parse_lsn("16B3/748"), Some(0x16B3_0000_0748));
        assert_eq!(format_lsn(0x16B3_0000_0748), "16B3/748");
    }
}

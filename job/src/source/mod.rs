//! Sources: where change batches come from.
//!
//! Every source hands the engine Arrow [`RecordBatch`]es whose columns are the
//! table's declared columns followed by the change metadata columns below.
//! A change is identified by its [`Position`] in the stream: the commit LSN of
//! its transaction and its index inside that transaction. Positions grow
//! strictly in stream order, which is what lets every sink skip what it has
//! already applied when a source delivers a change a second time.
//!
//! - [`pgoutput`]: decodes pgoutput messages straight into Arrow builders.
//! - [`replication`]: the `postgres-cdc` connector (slot, publication, checks,
//!   the streaming loop that cuts batches at transaction boundaries).
//! - [`snapshot`]: the consistent initial load of dimension tables.
//! - [`postgres`]: where a run starts (checks, the slot or checkpoint
//!   decision, the snapshot), the boundary the engine opens a source through.

pub mod pgoutput;
pub mod postgres;
pub mod replication;
pub mod snapshot;

use std::fmt;

use arrow::datatypes::{DataType, Field, TimeUnit};
use serde::{Deserialize, Serialize};

/// Change operation column: `c` (insert), `u` (update) or `d` (delete), Debezium's letters.
pub const OP_COLUMN: &str = "_op";
/// Commit LSN of the change's transaction, as a signed 64-bit integer (BigQuery has no UINT64).
pub const LSN_COLUMN: &str = "_lsn";
/// Index of the change within its transaction, from 0.
pub const SEQ_COLUMN: &str = "_seq";
/// Commit time of the change's transaction (UTC, microseconds).
pub const COMMIT_TS_COLUMN: &str = "_commit_ts";

/// A change whose row the decoder cannot represent (an infinite timestamp, a
/// date before the common era, a number out of the declared range, text that
/// is not UTF-8): it goes to the dead-letter output instead of the batch, and
/// the rest of its transaction flows.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedChange {
    /// `decode_error:<column>`.
    pub reason: String,
    /// What was wrong with the value.
    pub detail: String,
    pub position: Position,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_ts_micros: i64,
    /// The row as Postgres sent it: column name -> text, as JSON.
    pub row: String,
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
    }

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(parse_lsn("16B3/748"), Some(0x16B3_0000_0748));
        assert_eq!(format_lsn(0x16B3_0000_0748), "16B3/748");
    }
}

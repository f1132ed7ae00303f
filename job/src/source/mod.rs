//! Sources: where change batches come from.
//!
//! Every source hands the engine Arrow [`RecordBatch`]es whose columns are the
//! table's declared columns followed by the change metadata columns of
//! [`crate::change`]. A change is identified by its [`Position`] in the
//! stream: the commit LSN of its transaction and its index inside that
//! transaction. Positions grow strictly in stream order, which is what lets
//! every sink skip what it has already applied when a source delivers a change
//! a second time.
//!
//! [`RecordBatch`]: arrow::record_batch::RecordBatch
//!
//! - [`pgoutput`]: decodes pgoutput messages straight into Arrow builders.
//! - [`setup`]: what the `postgres-cdc` connector needs before it streams
//!   (where to connect, checks, publication, slot).
//! - [`replication`]: its streaming loop, which cuts batches at transaction
//!   boundaries.
//! - [`snapshot`]: the consistent initial load of dimension tables.
//! - [`tls`]: `sslmode` and `sslrootcert` for both connections.
//! - [`postgres`]: where a run starts (checks, the slot or checkpoint
//!   decision, the snapshot), the boundary the engine opens a source through.

pub mod pgoutput;
pub mod postgres;
pub mod replication;
pub mod setup;
pub mod snapshot;
pub mod tls;

use crate::change::Position;

/// A change whose row the decoder cannot represent (an infinite timestamp, a
/// date before the common era, a number out of the declared range, text that
/// is not UTF-8): it goes to the dead-letter output instead of the batch, and
/// the rest of its transaction flows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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

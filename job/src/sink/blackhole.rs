//! `connector = 'blackhole'`: a sink that counts its rows and discards them.
//!
//! It keeps the contract's positions (in the checkpoint, since there is no
//! store to keep them in), so a job with blackhole sinks restarts and
//! replays like any other. `engage bench` uses it to measure the pipeline
//! without the cost of its outputs.

use arrow::record_batch::RecordBatch;

use super::SinkState;
use crate::change::Position;

pub struct BlackholeSink {
    name: String,
    position: Position,
    rows_written: u64,
}

impl BlackholeSink {
    pub fn open(name: &str, restored: Option<&SinkState>) -> BlackholeSink {
        BlackholeSink {
            name: name.to_string(),
            position: restored.map(|state| state.position).unwrap_or_default(),
            rows_written: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// Discards `batches` and moves the position forward to `upto`.
    pub fn write(&mut self, batches: Vec<RecordBatch>, upto: Position) {
        self.rows_written += batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
        self.position = self.position.max(upto);
    }

    pub fn state(&self) -> SinkState {
        SinkState {
            position: self.position,
            ..SinkState::default()
        }
    }

    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }
}

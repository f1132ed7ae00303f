//! Refused batches into the job's `dead_letter` table: one Parquet file per
//! batch, named after its id, so writing it again after a replay replaces
//! the same file instead of adding a second one.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
use arrow::record_batch::RecordBatch;
use object_store::{ObjectStoreExt as _, PutPayload};
use parquet::arrow::ArrowWriter;

use super::RefusedBatch;
use crate::engine::dead_letter::schema;
use crate::sql::options::FilesystemOptions;
use crate::storage::{self, Location};

/// Where a webhook sink's refused rows go.
pub struct Target {
    sink: String,
    location: Location,
    /// Rows from a webhook carry no commit time, so with a time pattern
    /// they go to its NULL partition.
    directory: String,
}

impl Target {
    pub fn new(sink: &str, options: &FilesystemOptions) -> Result<Target, String> {
        Ok(Target {
            sink: sink.to_string(),
            location: storage::resolve(&options.path)?,
            directory: options
                .time_pattern
                .as_deref()
                .map(crate::sink::parquet::null_partition)
                .unwrap_or_default(),
        })
    }

    /// Writes (or writes again) the dead-letter file of `refused`.
    pub async fn write(&self, refused: &RefusedBatch) -> Result<(), String> {
        let rows = &refused.batch.rows;
        let reason = format!("webhook_rejected:{}", refused.status);
        let detail = serde_json::to_string(&refused.response).unwrap_or_default();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![self.sink.as_str(); rows.len()])),
            Arc::new(StringArray::from(vec![reason.as_str(); rows.len()])),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.position.lsn as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.position.seq as i64),
            )),
            Arc::new(TimestampMicrosecondArray::new_null(rows.len()).with_timezone("UTC")),
            // The row as sent, with the endpoint's answer beside it.
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| {
                format!(
                    "{{\"row\":{},\"status\":{},\"response\":{detail}}}",
                    r.json, refused.status
                )
            }))),
        ];
        let batch = RecordBatch::try_new(schema(), columns)
            .and_then(|b| {
                crate::values::parquet_batch(&b, &crate::values::parquet_schema(&schema()))
            })
            .map_err(|e| format!("cannot build the dead-letter rows: {e}"))?;
        let mut bytes = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), None)
            .map_err(|e| format!("cannot encode the dead-letter file: {e}"))?;
        writer
            .write(&batch)
            .and_then(|_| writer.close().map(|_| ()))
            .map_err(|e| format!("cannot encode the dead-letter file: {e}"))?;
        let file = format!("webhook-{}-{}.parquet", self.sink, refused.batch.id);
        let path = if self.directory.is_empty() {
            file
        } else {
            format!("{}/{file}", self.directory)
        };
        // A put replaces the file whole (local files: written aside, then renamed).
        self.location
            .store
            .put(&self.location.child(&path), PutPayload::from(bytes))
            .await
            .map_err(|e| {
                format!(
                    "failed to write dead-letter file {path} in {}: {e}",
                    self.location.display
                )
            })?;
        Ok(())
    }
}

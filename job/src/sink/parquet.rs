//! The `filesystem` sink: Parquet files, time-partitioned, committed with checkpoints.
//!
//! Rows are encoded as they arrive into one in-memory Parquet writer per
//! partition directory (e.g. `event_date=2026-11-21/`). At a checkpoint each
//! writer is closed and its file is *staged* under `_staging/`; the checkpoint
//! manifest lists the staged files; after the manifest is durable, `commit`
//! renames each into place as `<partition>/part-<epoch>-<n>.parquet`.
//!
//! So a reader listing `*.parquet` sees only whole files of checkpointed
//! epochs. After a crash, the restored job commits the files of the
//! checkpoint it resumes from again (a rename whose source is gone and whose
//! target exists is already done) and deletes every other staged file: those
//! epochs are replayed from the source. Nothing is lost or written twice.
//!
//! Rows whose partition time is NULL go to `<name>=__HIVE_DEFAULT_PARTITION__`,
//! Hive's convention, where `<name>` is the text before `=` in the pattern.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, TimestampMicrosecondArray, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::{SinkError, SinkState, StagedFile};
use crate::change::Position;
use crate::sql::options::{FilesystemOptions, ParquetCompression};
use crate::sql::plan::QueryPlan;
use crate::storage::{self, Location};
use crate::values;

const STAGING_DIR: &str = "_staging";
const MAX_ROW_GROUP_ROWS: usize = 128 * 1024;

/// Whether the local directory `dir` of a filesystem sink holds a committed
/// Parquet file (staged files, under `_staging/`, do not count): a table
/// without one has nothing a reader could see yet.
pub fn has_committed_files(dir: &std::path::Path) -> bool {
    committed_files(dir) > 0
}

/// Committed Parquet files under the local directory `dir` of a filesystem sink.
pub fn committed_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if entry.path().is_dir() {
                if name == STAGING_DIR {
                    0
                } else {
                    committed_files(&entry.path())
                }
            } else {
                usize::from(name.ends_with(".parquet"))
            }
        })
        .sum()
}

pub struct ParquetSink {
    name: String,
    location: Location,
    schema: SchemaRef,
    properties: WriterProperties,
    partitioner: Option<Partitioner>,
    /// Open writers of the current epoch, by partition directory ("" when unpartitioned).
    writers: BTreeMap<String, (ArrowWriter<Vec<u8>>, u64)>,
    position: Position,
    /// Readers see everything up to here: the last committed checkpoint's position.
    visible: Position,
    rows_written: u64,
    /// `bigquery.table`: each committed checkpoint's files are loaded.
    pub bigquery: Option<crate::bigquery::SinkLoads>,
}

impl ParquetSink {
    pub async fn open(
        name: &str,
        options: &FilesystemOptions,
        query: &QueryPlan,
        restored: Option<&SinkState>,
    ) -> Result<ParquetSink, SinkError> {
        Self::open_for_schema(
            name,
            options,
            query.output_schema.clone(),
            query.time_column,
            restored,
        )
        .await
    }

    /// Opens a sink for rows of `schema`, partitioned by column `time_column`
    /// when the options have a time pattern.
    pub async fn open_for_schema(
        name: &str,
        options: &FilesystemOptions,
        schema: arrow::datatypes::SchemaRef,
        time_column: Option<usize>,
        restored: Option<&SinkState>,
    ) -> Result<ParquetSink, SinkError> {
        let location = storage::resolve(&options.path).map_err(|message| SinkError::Permanent {
            sink: name.to_string(),
            message,
        })?;
        let compression = match options.compression {
            ParquetCompression::Zstd => {
                Compression::ZSTD(ZstdLevel::try_new(1).expect("zstd level 1 is valid"))
            }
            ParquetCompression::Snappy => Compression::SNAPPY,
            ParquetCompression::Uncompressed => Compression::UNCOMPRESSED,
        };
        let properties = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
            .build();
        let partitioner = match (&options.time_pattern, time_column) {
            (Some(pattern), Some(column)) => Some(Partitioner::new(pattern, column)),
            _ => None,
        };
        let mut sink = ParquetSink {
            name: name.to_string(),
            location,
            schema: values::parquet_schema(&schema),
            properties,
            partitioner,
            writers: BTreeMap::new(),
            position: restored.map(|s| s.position).unwrap_or_default(),
            visible: restored.map(|s| s.position).unwrap_or_default(),
            rows_written: 0,
            bigquery: None,
        };
        if let Some(state) = restored {
            sink.commit(state).await?;
        }
        sink.discard_staged().await?;
        Ok(sink)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Readers see every change up to here (published files).
    pub fn visible(&self) -> Position {
        self.visible
    }

    /// Encodes `batches` into the current epoch's writers (CPU only, no IO).
    pub fn write(&mut self, batches: Vec<RecordBatch>, upto: Position) -> Result<(), SinkError> {
        for batch in batches {
            match &mut self.partitioner {
                None => self.append(String::new(), &batch)?,
                Some(partitioner) => {
                    for (partition, rows) in partitioner.split(&batch) {
                        let part = match rows {
                            None => batch.clone(),
                            Some(indices) => take_record_batch(&batch, &indices)
                                .map_err(|e| self.permanent(e))?,
                        };
                        self.append(partition, &part)?;
                    }
                }
            }
            self.rows_written += batch.num_rows() as u64;
        }
        self.position = upto;
        Ok(())
    }

    fn append(&mut self, partition: String, batch: &RecordBatch) -> Result<(), SinkError> {
        if !self.writers.contains_key(&partition) {
            let writer = ArrowWriter::try_new(
                Vec::new(),
                self.schema.clone(),
                Some(self.properties.clone()),
            )
            .map_err(|e| self.permanent(e))?;
            self.writers.insert(partition.clone(), (writer, 0));
        }
        let batch = values::parquet_batch(batch, &self.schema).map_err(|e| self.permanent(e))?;
        let (writer, rows) = self.writers.get_mut(&partition).expect("inserted above");
        writer.write(&batch).map_err(|e| SinkError::Permanent {
            sink: self.name.clone(),
            message: format!("failed to encode parquet: {e}"),
        })?;
        *rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Closes this epoch's files and stages them; returns what to commit.
    pub async fn prepare_checkpoint(&mut self, epoch: u64) -> Result<SinkState, SinkError> {
        let mut staged = Vec::new();
        for (n, (partition, (writer, rows))) in
            std::mem::take(&mut self.writers).into_iter().enumerate()
        {
            let bytes = writer.into_inner().map_err(|e| self.permanent(e))?;
            let file = file_name(epoch, n);
            let target = if partition.is_empty() {
                file.clone()
            } else {
                format!("{partition}/{file}")
            };
            let staging = format!("{STAGING_DIR}/{epoch:012}/{file}.staged");
            let size = bytes.len() as u64;
            self.location
                .store
                .put(&self.location.child(&staging), PutPayload::from(bytes))
                .await
                .map_err(|e| {
                    self.transient(format!(
                        "failed to stage {staging} in {}: {e}",
                        self.location.display
                    ))
                })?;
            staged.push(StagedFile {
                staging,
                target,
                rows,
                bytes: size,
            });
        }
        Ok(SinkState {
            position: self.position,
            staged,
            bigquery: self.bigquery.as_ref().map(|loads| loads.progress(epoch)),
            ..SinkState::default()
        })
    }

    /// Publishes staged files (idempotent).
    pub async fn commit(&mut self, state: &SinkState) -> Result<(), SinkError> {
        for file in &state.staged {
            let from = self.location.child(&file.staging);
            let to = self.location.child(&file.target);
            match self.location.store.rename(&from, &to).await {
                Ok(()) => crate::failpoint::hit("parquet_commit"),
                Err(object_store::Error::NotFound { .. }) => {
                    if self.location.store.head(&to).await.is_err() {
                        return Err(SinkError::Permanent {
                            sink: self.name.clone(),
                            message: format!(
                                "checkpointed file {} is neither staged nor published in {}; \
                                 was the output directory changed by hand?",
                                file.target, self.location.display
                            ),
                        });
                    }
                }
                Err(e) => {
                    return Err(self.transient(format!("failed to publish {}: {e}", file.target)));
                }
            }
        }
        self.visible = self.visible.max(state.position);
        Ok(())
    }

    /// Deletes staged files no checkpoint refers to (epochs that will be replayed).
    async fn discard_staged(&mut self) -> Result<(), SinkError> {
        let prefix = self.location.child(STAGING_DIR);
        let leftovers: Vec<Path> = self
            .location
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(|e| {
                self.transient(format!(
                    "failed to list {STAGING_DIR} in {}: {e}",
                    self.location.display
                ))
            })?;
        for path in leftovers {
            self.location
                .store
                .delete(&path)
                .await
                .map_err(|e| self.transient(format!("failed to delete {path}: {e}")))?;
        }
        if let Some(dir) = local_dir(&self.location, STAGING_DIR) {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }

    fn permanent(&self, error: impl std::fmt::Display) -> SinkError {
        SinkError::Permanent {
            sink: self.name.clone(),
            message: error.to_string(),
        }
    }

    fn transient(&self, message: String) -> SinkError {
        SinkError::Transient {
            sink: self.name.clone(),
            message,
        }
    }
}

/// Local directories left empty by object_store are tidied by hand.
fn local_dir(location: &Location, child: &str) -> Option<std::path::PathBuf> {
    if location.display.contains("://") && !location.display.starts_with("file://") {
        return None;
    }
    let base = location.display.trim_start_matches("file://");
    Some(std::path::Path::new(base).join(child))
}

/// Maps rows to partition directories by formatting their time with the pattern.
struct Partitioner {
    pattern: String,
    column: usize,
    /// Microseconds per bucket: the finest unit the pattern prints.
    bucket_micros: i64,
    /// Formatted directory of recently seen buckets.
    cache: BTreeMap<i64, Arc<str>>,
    null_partition: String,
}

/// The name of a checkpoint's `n`-th file: `part-<epoch>-<n>-<random>.parquet`.
fn file_name(epoch: u64, n: usize) -> String {
    format!(
        "part-{epoch:012}-{n:04}-{:08x}.parquet",
        rand::random::<u32>()
    )
}

/// The epoch of a committed file ([`file_name`]), from its path.
pub fn epoch_of(path: &str) -> Option<u64> {
    let name = path.rsplit('/').next()?;
    name.strip_prefix("part-")?.split('-').next()?.parse().ok()
}

/// The directory that rows with a NULL time go to under `pattern`, as Hive
/// and BigQuery name it.
pub fn null_partition(pattern: &str) -> String {
    match pattern.split_once('=') {
        Some((name, _)) if !name.contains('%') => format!("{name}=__HIVE_DEFAULT_PARTITION__"),
        _ => "__HIVE_DEFAULT_PARTITION__".to_string(),
    }
}

impl Partitioner {
    fn new(pattern: &str, column: usize) -> Self {
        let has = |codes: &[&str]| codes.iter().any(|c| pattern.contains(c));
        let bucket_micros = if has(&["%S", "%s", "%T", "%X", "%c", "%+", "%f", "%.f"]) {
            1_000_000
        } else if has(&["%M", "%R"]) {
            60_000_000
        } else if has(&["%H", "%I", "%k", "%l", "%p"]) {
            3_600_000_000
        } else {
            86_400_000_000
        };
        let null_partition = null_partition(pattern);
        Partitioner {
            pattern: pattern.to_string(),
            column,
            bucket_micros,
            cache: BTreeMap::new(),
            null_partition,
        }
    }

    fn directory(&mut self, bucket: i64) -> Arc<str> {
        if let Some(dir) = self.cache.get(&bucket) {
            return dir.clone();
        }
        if self.cache.len() > 1024 {
            self.cache.clear();
        }
        let time =
            DateTime::<Utc>::from_timestamp_micros(bucket * self.bucket_micros).unwrap_or_default();
        let dir: Arc<str> = time.format(&self.pattern).to_string().into();
        self.cache.insert(bucket, dir.clone());
        dir
    }

    /// Splits a batch by partition: `None` indices mean "the whole batch".
    fn split(&mut self, batch: &RecordBatch) -> Vec<(String, Option<UInt32Array>)> {
        let times = batch
            .column(self.column)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("sink schema has UTC microsecond timestamps");
        let bucket_of = |row: usize| {
            times
                .is_valid(row)
                .then(|| times.value(row).div_euclid(self.bucket_micros))
        };
        let first = if batch.num_rows() > 0 {
            bucket_of(0)
        } else {
            None
        };
        if (0..batch.num_rows()).all(|row| bucket_of(row) == first) {
            let dir = match first {
                Some(bucket) => self.directory(bucket).to_string(),
                None => self.null_partition.clone(),
            };
            return vec![(dir, None)];
        }
        let mut groups: BTreeMap<Option<i64>, Vec<u32>> = BTreeMap::new();
        for row in 0..batch.num_rows() {
            groups.entry(bucket_of(row)).or_default().push(row as u32);
        }
        groups
            .into_iter()
            .map(|(bucket, rows)| {
                let dir = match bucket {
                    Some(bucket) => self.directory(bucket).to_string(),
                    None => self.null_partition.clone(),
                };
                (dir, Some(UInt32Array::from(rows)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    fn batch(times: Vec<Option<i64>>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "t",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        )]));
        let array = TimestampMicrosecondArray::from(times).with_timezone("UTC");
        RecordBatch::try_new(schema, vec![Arc::new(array)]).unwrap()
    }

    #[test]
    fn partitioner_groups_rows_by_formatted_day() {
        let mut partitioner = Partitioner::new("event_date=%Y-%m-%d", 0);
        let day = 86_400_000_000i64;
        let parts = partitioner.split(&batch(vec![Some(0), Some(day + 5), Some(10), None]));
        let dirs: Vec<_> = parts.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(
            dirs,
            vec![
                "event_date=__HIVE_DEFAULT_PARTITION__",
                "event_date=1970-01-01",
                "event_date=1970-01-02"
            ]
        );
        assert_eq!(parts[1].1.as_ref().unwrap().values().to_vec(), vec![0, 2]);
    }

    #[test]
    fn partitioner_keeps_single_partition_batches_whole() {
        let mut partitioner = Partitioner::new("event_date=%Y-%m-%d", 0);
        let parts = partitioner.split(&batch(vec![Some(1), Some(2)]));
        assert_eq!(parts.len(), 1);
        assert!(parts[0].1.is_none());
    }

    #[test]
    fn hourly_patterns_bucket_by_hour() {
        let partitioner = Partitioner::new("dt=%Y-%m-%d/hour=%H", 0);
        assert_eq!(partitioner.bucket_micros, 3_600_000_000);
    }
}

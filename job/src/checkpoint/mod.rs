//! Checkpoints: what a job needs to resume, written atomically.
//!
//! Layout under the checkpoint location (a directory or object store URL):
//!
//! ```text
//! <job>/epoch-000000000012/
//!     dimension-content.arrows        dimension table contents (Arrow IPC, zstd)
//!     capture-engagement_events.arrows  every source change of this epoch
//!     manifest.json                   written last: the checkpoint exists iff it does
//! ```
//!
//! # Semantics
//!
//! Checkpoint N describes the job after processing every source change up
//! to `source.resume_lsn`, a transaction boundary: the dimension tables as of
//! then, each sink's [`SinkState`], and the *capture* of the changes read
//! during epoch N (between checkpoints N-1 and N). The state files are
//! written first; the manifest last, with a single `put`, which is atomic on
//! every object_store backend (local files are written to a temporary name
//! and renamed). A crash before the manifest leaves stray files that the next
//! checkpoint of the same epoch overwrites.
//!
//! Only after the manifest is durable are sink commits run and the
//! replication slot confirmed up to `resume_lsn`. So the slot never forgets a
//! change that the newest checkpoint does not cover.
//!
//! The capture log is what makes `engage replay --from-checkpoint N` possible:
//! a Postgres slot cannot rewind, so the job keeps its own copy of the
//! changes of the last `keep` epochs and reprocesses them from there.

use std::collections::BTreeMap;

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow::ipc::CompressionType;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::change::{format_lsn, Position};
use crate::sink::SinkState;
use crate::storage::{self, Location};

mod capture;
mod retention;
pub use capture::CaptureLog;
pub use retention::{Kept, Retention, BASE_EVERY};

/// Default number of checkpoints kept whole (older ones are thinned: retention.rs).
pub const DEFAULT_KEEP: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint location {location}: {message}")]
    Storage { location: String, message: String },
    #[error("checkpoint {epoch} of job `{job}` does not exist in {location}; `engage checkpoints` lists them")]
    NotFound {
        job: String,
        epoch: u64,
        location: String,
    },
    #[error(
        "checkpoint {epoch} in {location} was written by a newer engage (manifest format {format}; this \
         version reads up to {FORMAT}): run that version, or start the job under a new name (--name)"
    )]
    NewerFormat {
        epoch: u64,
        location: String,
        format: u32,
    },
    #[error("checkpoint {epoch} in {location} is unreadable: {message}")]
    Corrupt {
        epoch: u64,
        location: String,
        message: String,
    },
}

/// The manifest format this version writes, and the newest it reads:
/// 1, the first; 2, window state in layers (`WindowCheckpoint::base`) and
/// thinned checkpoints (`kept`), which a version reading only 1 would
/// misread.
pub const FORMAT: u32 = 2;

/// The manifest of one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// See [`FORMAT`]; manifests without one are format 1.
    #[serde(default = "first_format")]
    pub format: u32,
    pub job: String,
    pub epoch: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub source: SourceState,
    pub sinks: BTreeMap<String, SinkState>,
    /// Dimension table name -> state file.
    pub dimensions: BTreeMap<String, StateFile>,
    /// Source table name -> capture file of this epoch's changes.
    pub capture_files: BTreeMap<String, StateFile>,
    /// Order of the captured batches: (table, rows), in stream order.
    pub capture_order: Vec<(String, u64)>,
    /// Hash of the job SQL the checkpoint was taken with.
    pub sql_hash: String,
    /// The UDF libraries the job ran with: function name -> SHA-256 of the library.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub udfs: BTreeMap<String, String>,
    /// Window state per `<sink>/<aggregate index>`.
    #[serde(default)]
    pub windows: BTreeMap<String, WindowCheckpoint>,
    /// Per windowed sink, the last window it was written: what a sink whose
    /// store lost its data is rewritten with.
    #[serde(default)]
    pub window_outputs: BTreeMap<String, WindowOutput>,
    /// What the checkpoint still holds: older ones are thinned (retention.rs).
    #[serde(default, skip_serializing_if = "Kept::is_everything")]
    pub kept: Kept,
    /// The backfill under way (`engage backfill`), as of this checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<crate::backfill::Progress>,
    /// Backfills that ended, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backfills: Vec<crate::backfill::Finished>,
}

fn first_format() -> u32 {
    1
}

/// The rows of the last window written to a windowed sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowOutput {
    /// End of the window (Unix µs).
    pub end: i64,
    pub state: StateFile,
}

/// The state of one windowed aggregate in a checkpoint: `state` alone (a
/// whole snapshot), or the buckets changed since the checkpoint before, over
/// the layers in `base` (engine/window's module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowCheckpoint {
    pub state: StateFile,
    pub meta: WindowMeta,
    /// The layers `state` goes over, oldest (a whole snapshot) first, each in
    /// the checkpoint that wrote it. Empty: `state` is whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base: Vec<EpochFile>,
}

/// A file of another checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochFile {
    pub epoch: u64,
    #[serde(flatten)]
    pub file: StateFile,
}

/// Window bookkeeping kept beside a window's state (engine/window).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WindowMeta {
    /// End of the last window emitted (Unix µs).
    pub last_end: Option<i64>,
    /// Whether that emission had no rows.
    pub last_emission_empty: bool,
    /// Newest event time seen (Unix µs).
    pub max_event_time: Option<i64>,
}

/// Where the source stood at the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceState {
    pub slot: String,
    /// Replication resumes here: the end LSN of the last processed commit.
    pub resume_lsn: u64,
    /// Same, in Postgres' text form, for people reading the manifest.
    pub resume_lsn_text: String,
    /// Position of the last change processed.
    pub position: Position,
    /// Where the stream began: what it can never have delivered. Absent in
    /// checkpoints of jobs whose slot predates this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<StreamOrigin>,
}

/// The snapshot the job's slot exported when it was created: the row
/// versions it sees committed before the stream's first change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOrigin {
    /// `pg_current_snapshot()` text: `xmin:xmax:xip,...`.
    pub snapshot: String,
    /// The server's clock then (Unix µs).
    pub at_micros: i64,
}

impl SourceState {
    pub fn new(
        slot: &str,
        resume_lsn: u64,
        position: Position,
        origin: Option<StreamOrigin>,
    ) -> Self {
        SourceState {
            slot: slot.to_string(),
            resume_lsn,
            resume_lsn_text: format_lsn(resume_lsn),
            position,
            origin,
        }
    }
}

/// A file of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
}

impl StateFile {
    /// Encodes `batches` as the checkpoint file `file`, added to `files`
    /// (what the checkpoint writes), and describes it.
    pub fn encode(
        file: String,
        schema: &SchemaRef,
        batches: &[RecordBatch],
        files: &mut Vec<(String, Bytes)>,
    ) -> Result<StateFile, arrow::error::ArrowError> {
        StateWriter::holding(schema, batches)?.finish(file, files)
    }
}

/// A checkpoint file written a batch at a time (see [`StateFile::encode`]),
/// so that the batches need not all be in memory at once.
pub struct StateWriter {
    writer: StreamWriter<Vec<u8>>,
    rows: u64,
}

impl StateWriter {
    pub fn new(schema: &SchemaRef) -> Result<StateWriter, arrow::error::ArrowError> {
        Ok(StateWriter {
            writer: StreamWriter::try_new_with_options(Vec::new(), schema, ipc_options()?)?,
            rows: 0,
        })
    }

    /// A writer that has written `batches`.
    fn holding(
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<StateWriter, arrow::error::ArrowError> {
        let mut writer = StateWriter::new(schema)?;
        for batch in batches {
            writer.write(batch)?;
        }
        Ok(writer)
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), arrow::error::ArrowError> {
        self.rows += batch.num_rows() as u64;
        self.writer.write(batch)
    }

    /// Ends the file as `file`, added to `files` (what the checkpoint
    /// writes), and describes it.
    pub fn finish(
        self,
        file: String,
        files: &mut Vec<(String, Bytes)>,
    ) -> Result<StateFile, arrow::error::ArrowError> {
        let rows = self.rows;
        let bytes = self.into_bytes()?;
        let state = StateFile {
            file: file.clone(),
            rows,
            bytes: bytes.len() as u64,
        };
        files.push((file, bytes));
        Ok(state)
    }

    /// Ends the stream: its bytes.
    pub fn into_bytes(mut self) -> Result<Bytes, arrow::error::ArrowError> {
        self.writer.finish()?;
        Ok(Bytes::from(self.writer.into_inner()?))
    }
}

impl Manifest {
    /// Total bytes of the checkpoint's files.
    pub fn state_bytes(&self) -> u64 {
        // Windows shared by several sinks name the same file.
        let files: BTreeMap<&str, u64> = self
            .dimensions
            .values()
            .chain(self.capture_files.values())
            .chain(self.windows.values().map(|w| &w.state))
            .map(|f| (f.file.as_str(), f.bytes))
            .collect();
        files.values().sum()
    }

    pub fn captured_rows(&self) -> u64 {
        self.capture_order.iter().map(|(_, rows)| rows).sum()
    }
}

/// The checkpoints of one job.
pub struct CheckpointStore {
    location: Location,
    job: String,
}

impl CheckpointStore {
    /// `dir` is a directory or URL holding checkpoints of many jobs.
    pub fn open(dir: &str, job: &str) -> Result<CheckpointStore, CheckpointError> {
        let mut location = storage::resolve(dir).map_err(|message| CheckpointError::Storage {
            location: dir.to_string(),
            message,
        })?;
        location.prefix = location.child(job);
        location.display = format!("{}/{job}", dir.trim_end_matches('/'));
        Ok(CheckpointStore {
            location,
            job: job.to_string(),
        })
    }

    pub fn display(&self) -> &str {
        &self.location.display
    }

    fn epoch_dir(epoch: u64) -> String {
        format!("epoch-{epoch:012}")
    }

    fn storage_error(&self, message: String) -> CheckpointError {
        CheckpointError::Storage {
            location: self.location.display.clone(),
            message,
        }
    }

    /// Every checkpoint, oldest first.
    pub async fn list(&self) -> Result<Vec<Manifest>, CheckpointError> {
        let mut manifests = Vec::new();
        for epoch in self.epochs().await? {
            manifests.extend(self.load_complete(epoch).await?);
        }
        Ok(manifests)
    }

    /// The manifest of checkpoint `epoch`, or `None` if it never completed
    /// (a directory without a manifest).
    pub async fn load_complete(&self, epoch: u64) -> Result<Option<Manifest>, CheckpointError> {
        match self.load(epoch).await {
            Ok(manifest) => Ok(Some(manifest)),
            Err(CheckpointError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The epochs that have a directory (complete or not), oldest first,
    /// without reading their manifests.
    pub async fn epochs(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut epochs = Vec::new();
        let listing = self.list_job_dir("checkpoints").await?;
        for dir in listing.common_prefixes {
            if let Some(epoch) = dir
                .filename()
                .and_then(|name| name.strip_prefix("epoch-"))
                .and_then(|n| n.parse().ok())
            {
                epochs.push(epoch);
            }
        }
        epochs.sort_unstable();
        Ok(epochs)
    }

    /// The newest complete checkpoint.
    pub async fn latest(&self) -> Result<Option<Manifest>, CheckpointError> {
        self.newest_where(|_| true).await
    }

    /// The newest complete checkpoint for which `wanted` holds. Manifests are
    /// read newest first, and none older than the one found.
    pub async fn newest_where(
        &self,
        wanted: impl Fn(&Manifest) -> bool,
    ) -> Result<Option<Manifest>, CheckpointError> {
        for epoch in self.epochs().await?.into_iter().rev() {
            if let Some(manifest) = self.load_complete(epoch).await? {
                if wanted(&manifest) {
                    return Ok(Some(manifest));
                }
            }
        }
        Ok(None)
    }

    pub async fn load(&self, epoch: u64) -> Result<Manifest, CheckpointError> {
        let path = self
            .location
            .child(&format!("{}/manifest.json", Self::epoch_dir(epoch)));
        let bytes = match self.location.store.get(&path).await {
            Ok(result) => result
                .bytes()
                .await
                .map_err(|e| self.storage_error(e.to_string()))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CheckpointError::NotFound {
                    job: self.job.clone(),
                    epoch,
                    location: self.location.display.clone(),
                })
            }
            Err(e) => return Err(self.storage_error(format!("failed to read {path}: {e}"))),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
                epoch,
                location: self.location.display.clone(),
                message: e.to_string(),
            })?;
        if manifest.format > FORMAT {
            return Err(CheckpointError::NewerFormat {
                epoch,
                location: self.location.display.clone(),
                format: manifest.format,
            });
        }
        Ok(manifest)
    }

    /// Writes a checkpoint: `files` (name, contents) first, the manifest last.
    pub async fn write(
        &self,
        manifest: &Manifest,
        files: Vec<(String, Bytes)>,
    ) -> Result<(), CheckpointError> {
        let dir = Self::epoch_dir(manifest.epoch);
        for (name, bytes) in files {
            let path = self.location.child(&format!("{dir}/{name}"));
            self.location
                .store
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(|e| self.storage_error(format!("failed to write {path}: {e}")))?;
        }
        let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
        let path = self.location.child(&format!("{dir}/manifest.json"));
        self.location
            .store
            .put(&path, PutPayload::from(json))
            .await
            .map_err(|e| self.storage_error(format!("failed to write {path}: {e}")))?;
        Ok(())
    }

    /// Deletes a whole checkpoint directory.
    async fn delete_epoch(&self, epoch: u64) -> Result<(), CheckpointError> {
        let prefix = self.location.child(&Self::epoch_dir(epoch));
        let files: Vec<_> = self
            .location
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.storage_error(format!("failed to list {prefix}: {e}")))?;
        for meta in files {
            self.location
                .store
                .delete(&meta.location)
                .await
                .map_err(|e| {
                    self.storage_error(format!("failed to delete {}: {e}", meta.location))
                })?;
        }
        if !self.location.display.contains("://") {
            // Object stores have no directories; a local one keeps them empty.
            let _ = std::fs::remove_dir_all(
                std::path::Path::new(&self.location.display).join(Self::epoch_dir(epoch)),
            );
        }
        Ok(())
    }

    /// Deletes one file of a checkpoint (already gone is fine).
    async fn delete_file(&self, epoch: u64, name: &str) -> Result<(), CheckpointError> {
        let path = self
            .location
            .child(&format!("{}/{name}", Self::epoch_dir(epoch)));
        match self.location.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.storage_error(format!("failed to delete {path}: {e}"))),
        }
    }

    /// A control file beside the checkpoints (`<job>/<name>`), if there is one.
    pub async fn get_control(&self, name: &str) -> Result<Option<Bytes>, CheckpointError> {
        let path = self.location.child(name);
        match self.location.store.get(&path).await {
            Ok(result) => Ok(Some(result.bytes().await.map_err(|e| {
                self.storage_error(format!("failed to read {path}: {e}"))
            })?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.storage_error(format!("failed to read {path}: {e}"))),
        }
    }

    /// Writes a control file beside the checkpoints (`<job>/<name>`).
    pub async fn put_control(&self, name: &str, bytes: Vec<u8>) -> Result<(), CheckpointError> {
        let path = self.location.child(name);
        self.location
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| self.storage_error(format!("failed to write {path}: {e}")))?;
        Ok(())
    }

    /// What the job's directory holds directly: epoch directories as
    /// common prefixes, control files as objects; nothing if it does not
    /// exist yet. `what`: what the listing is for, in the error.
    async fn list_job_dir(&self, what: &str) -> Result<object_store::ListResult, CheckpointError> {
        match self
            .location
            .store
            .list_with_delimiter(Some(&self.location.prefix))
            .await
        {
            Ok(listing) => Ok(listing),
            Err(object_store::Error::NotFound { .. }) => Ok(object_store::ListResult {
                common_prefixes: Vec::new(),
                objects: Vec::new(),
            }),
            Err(e) => Err(self.storage_error(format!("failed to list {what}: {e}"))),
        }
    }

    /// The names of the control files beside the checkpoints that start
    /// with `prefix`.
    pub async fn control_files(&self, prefix: &str) -> Result<Vec<String>, CheckpointError> {
        Ok(self
            .list_job_dir("control files")
            .await?
            .objects
            .into_iter()
            .filter_map(|object| object.location.filename().map(str::to_string))
            .filter(|name| name.starts_with(prefix))
            .collect())
    }

    /// Deletes a control file (already gone is fine).
    pub async fn delete_control(&self, name: &str) -> Result<(), CheckpointError> {
        let path = self.location.child(name);
        match self.location.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.storage_error(format!("failed to delete {path}: {e}"))),
        }
    }

    pub async fn read_file(&self, epoch: u64, name: &str) -> Result<Bytes, CheckpointError> {
        let path = self
            .location
            .child(&format!("{}/{name}", Self::epoch_dir(epoch)));
        let result =
            self.location
                .store
                .get(&path)
                .await
                .map_err(|e| CheckpointError::Corrupt {
                    epoch,
                    location: self.location.display.clone(),
                    message: format!("failed to read {name}: {e}"),
                })?;
        result
            .bytes()
            .await
            .map_err(|e| self.storage_error(e.to_string()))
    }
}

/// How checkpoint files (state and capture) are written: Arrow IPC, zstd at
/// level 1, which costs about half the CPU of zstd's default level for files
/// a little larger. Readers need no setting: the codec is in each file.
pub fn ipc_options() -> Result<IpcWriteOptions, arrow::error::ArrowError> {
    IpcWriteOptions::default()
        .try_with_compression(Some(CompressionType::ZSTD))?
        .try_with_compression_level(Some(1))
}

/// Encodes batches as an Arrow IPC stream (see [`ipc_options`]).
pub fn encode_ipc(
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Bytes, arrow::error::ArrowError> {
    StateWriter::holding(schema, batches)?.into_bytes()
}

/// Decodes an Arrow IPC stream.
pub fn decode_ipc(bytes: Bytes) -> Result<Vec<RecordBatch>, arrow::error::ArrowError> {
    StreamReader::try_new(std::io::Cursor::new(bytes), None)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use std::time::Duration;

    fn keep(keep: usize) -> Retention {
        Retention {
            keep,
            capture: Duration::ZERO,
        }
    }

    async fn kept(store: &CheckpointStore) -> Vec<(u64, Kept)> {
        let manifests = store.list().await.unwrap();
        manifests.iter().map(|m| (m.epoch, m.kept)).collect()
    }

    /// A one-row file named `name`.
    fn file(name: &str) -> StateFile {
        StateFile {
            file: name.into(),
            rows: 1,
            bytes: 1,
        }
    }

    async fn epochs(store: &CheckpointStore) -> Vec<u64> {
        store
            .list()
            .await
            .unwrap()
            .iter()
            .map(|m| m.epoch)
            .collect()
    }

    fn manifest(job: &str, epoch: u64) -> Manifest {
        Manifest {
            format: FORMAT,
            job: job.into(),
            epoch,
            created_at: "2026-11-21T00:00:00Z".into(),
            source: SourceState::new("slot", 100 + epoch, Position::new(epoch, 0), None),
            sinks: BTreeMap::new(),
            dimensions: BTreeMap::new(),
            capture_files: BTreeMap::new(),
            capture_order: Vec::new(),
            sql_hash: String::new(),
            udfs: BTreeMap::new(),
            windows: BTreeMap::new(),
            window_outputs: BTreeMap::new(),
            kept: Kept::Everything,
            backfill: None,
            backfills: Vec::new(),
        }
    }

    #[tokio::test]
    async fn checkpoints_list_in_epoch_order_and_prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), "job").unwrap();
        for epoch in [3, 1, 2, 4] {
            store
                .write(
                    &manifest("job", epoch),
                    vec![("x.bin".into(), Bytes::from_static(b"x"))],
                )
                .await
                .unwrap();
        }
        assert_eq!(epochs(&store).await, vec![1, 2, 3, 4]);
        store.prune(keep(2), None, Utc::now()).await.unwrap();
        assert_eq!(epochs(&store).await, vec![3, 4]);
        assert!(!dir.path().join("job/epoch-000000000001").exists());
    }

    #[tokio::test]
    async fn prune_keeps_what_a_detached_sink_will_be_caught_up_from() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), "job").unwrap();
        for epoch in 1..=6 {
            store.write(&manifest("job", epoch), vec![]).await.unwrap();
        }
        // A sink detached holding position (2, 5): checkpoint 2 (at (2, 0))
        // is the newest at or below it; it and every later one stay, and it
        // keeps its dimension tables.
        store
            .prune(keep(2), Some(Position::new(2, 5)), Utc::now())
            .await
            .unwrap();
        assert_eq!(epochs(&store).await, vec![2, 3, 4, 5, 6]);
        assert_eq!(kept(&store).await[0], (2, Kept::CaptureAndDimensions));
        // Caught up: back to the newest `keep`.
        store.prune(keep(2), None, Utc::now()).await.unwrap();
        assert_eq!(epochs(&store).await, vec![5, 6]);
    }

    #[tokio::test]
    async fn older_checkpoints_keep_their_capture_for_the_retention_and_a_base_every_span() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), "job").unwrap();
        // One checkpoint every 4 minutes: spans of 10 minutes start at 1, 4 and 6.
        for epoch in 1..=6u64 {
            let mut manifest = manifest("job", epoch);
            manifest.created_at = format!("2026-11-21T00:{:02}:00Z", (epoch - 1) * 4);
            manifest
                .dimensions
                .insert("d".into(), file("dimension-d.arrows"));
            manifest
                .capture_files
                .insert("t".into(), file("capture-t.arrows"));
            let meta = WindowMeta::default();
            let state = file("window-w.arrows");
            manifest.windows.insert(
                "w/0".into(),
                WindowCheckpoint {
                    state,
                    meta,
                    base: Vec::new(),
                },
            );
            let names = ["dimension-d.arrows", "capture-t.arrows", "window-w.arrows"];
            let files = names
                .iter()
                .map(|n| (n.to_string(), Bytes::from_static(b"x")))
                .collect();
            store.write(&manifest, files).await.unwrap();
        }
        let retention = Retention {
            keep: 2,
            capture: Duration::from_secs(3600),
        };
        let soon = "2026-11-21T00:30:00Z".parse::<DateTime<Utc>>().unwrap();
        store.prune(retention, None, soon).await.unwrap();
        // Twice changes nothing more.
        store.prune(retention, None, soon).await.unwrap();
        use Kept::*;
        assert_eq!(
            kept(&store).await,
            vec![
                (1, CaptureAndDimensions),
                (2, Capture),
                (3, Capture),
                (4, CaptureAndDimensions),
                (5, Everything),
                (6, Everything)
            ]
        );
        let on_disk = |epoch: u64| {
            let mut names: Vec<String> =
                std::fs::read_dir(dir.path().join(format!("job/epoch-{epoch:012}")))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
            names.sort();
            names
        };
        assert_eq!(on_disk(2), ["capture-t.arrows", "manifest.json"]);
        assert_eq!(
            on_disk(4),
            ["capture-t.arrows", "dimension-d.arrows", "manifest.json"]
        );
        assert_eq!(on_disk(6).len(), 4);
        // Past the retention, the thinned ones go.
        let later = "2026-11-21T02:00:00Z".parse::<DateTime<Utc>>().unwrap();
        store.prune(retention, None, later).await.unwrap();
        assert_eq!(epochs(&store).await, vec![5, 6]);
    }

    #[tokio::test]
    async fn checkpoints_whose_window_files_a_whole_one_builds_on_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), "job").unwrap();
        for epoch in 1..=5 {
            let mut manifest = manifest("job", epoch);
            let base = match epoch {
                // Changes over checkpoint 2's whole snapshot and 3's changes.
                4 | 5 => (2..epoch)
                    .map(|e| EpochFile {
                        epoch: e,
                        file: file("window-w-0.arrows"),
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let state = file("window-w-0.arrows");
            let meta = WindowMeta::default();
            manifest
                .windows
                .insert("w/0".into(), WindowCheckpoint { state, meta, base });
            // Another state, whose chain at checkpoint 3 starts at 1.
            if epoch == 3 {
                let state = file("window-v-0.arrows");
                let base = vec![EpochFile {
                    epoch: 1,
                    file: file("window-v-0.arrows"),
                }];
                let meta = WindowMeta::default();
                manifest
                    .windows
                    .insert("v/0".into(), WindowCheckpoint { state, meta, base });
            }
            let files = vec![("window-w-0.arrows".into(), Bytes::from_static(b"x"))];
            store.write(&manifest, files).await.unwrap();
        }
        store.prune(keep(2), None, Utc::now()).await.unwrap();
        // 4 and 5 are the newest; they build on 2 and 3, and 3 on 1.
        assert_eq!(
            kept(&store).await,
            (1..=5).map(|e| (e, Kept::Everything)).collect::<Vec<_>>()
        );
        assert!(dir
            .path()
            .join("job/epoch-000000000002/window-w-0.arrows")
            .exists());
    }

    #[tokio::test]
    async fn manifests_say_their_format_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), "job").unwrap();
        store.write(&manifest("job", 1), vec![]).await.unwrap();
        let path = dir.path().join("job/epoch-000000000001/manifest.json");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["format"], FORMAT);
        // Written before formats were recorded: the first.
        json.as_object_mut().unwrap().remove("format");
        std::fs::write(&path, json.to_string()).unwrap();
        assert_eq!(store.load(1).await.unwrap().format, 1);
        json["format"] = (FORMAT + 1).into();
        std::fs::write(&path, json.to_string()).unwrap();
        let error = store.load(1).await.unwrap_err();
        assert!(
            matches!(error, CheckpointError::NewerFormat { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("written by a newer engage"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_checkpoint_without_manifest_does_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path().to_str().unwrap(), "job").unwrap();
        store.write(&manifest("job", 1), vec![]).await.unwrap();
        std::fs::create_dir_all(dir.path().join("job/epoch-000000000002")).unwrap();
        std::fs::write(
            dir.path().join("job/epoch-000000000002/capture-t.arrows"),
            b"partial",
        )
        .unwrap();
        assert_eq!(store.latest().await.unwrap().unwrap().epoch, 1);
        assert!(matches!(
            store.load(2).await,
            Err(CheckpointError::NotFound { .. })
        ));
    }
}

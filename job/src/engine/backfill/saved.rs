//! Chunks saved before they are emitted. A chunk's rows depend on the table
//! as it was when read; after a crash, its high watermark is streamed again
//! (the checkpoint before it resumes there), and reading the chunk again then
//! could give other rows (one updated since now counts as streamed), so a
//! sink that held the first emission would disagree with one that did not.
//! So the rows go beside the checkpoints first (`backfill-chunk-<nonce>.*`),
//! and a watermark streamed again emits exactly them, at the same positions,
//! where sinks drop what they hold. A checkpoint that covers a chunk deletes
//! its files.

use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{decode_ipc, encode_ipc};
use crate::engine::{Engine, JobError};
use crate::source::RejectedChange;

/// A chunk ready to go through the job.
pub(super) struct Prepared {
    /// The rows to emit, positions set.
    pub(super) rows: RecordBatch,
    pub(super) summary: Summary,
}

/// What else a chunk carries, beside its rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Summary {
    pub(super) read: u64,
    pub(super) superseded: u64,
    pub(super) streamed: u64,
    /// Where the next chunk starts (`None`: where this one did).
    pub(super) last_key: Option<String>,
    /// The range is read to its end.
    pub(super) last: bool,
    /// Rows with values the declared types cannot hold (to dead_letter).
    pub(super) rejected: Vec<RejectedChange>,
}

/// What every saved chunk's files are named with first.
const PREFIX: &str = "backfill-chunk-";

fn rows_file(nonce: u64) -> String {
    format!("{PREFIX}{nonce:016x}.arrows")
}

fn summary_file(nonce: u64) -> String {
    format!("{PREFIX}{nonce:016x}.json")
}

impl Engine {
    /// Saves `prepared` under `nonce`: the rows first, the summary last (a
    /// chunk is saved iff its summary exists).
    pub(super) async fn save_chunk(
        &mut self,
        nonce: u64,
        prepared: &Prepared,
    ) -> Result<(), JobError> {
        let rows = encode_ipc(
            &prepared.rows.schema(),
            std::slice::from_ref(&prepared.rows),
        )
        .map_err(JobError::state("backfill chunk"))?;
        self.store
            .put_control(&rows_file(nonce), rows.to_vec())
            .await?;
        let summary = serde_json::to_vec(&prepared.summary).expect("summary serialises");
        self.store
            .put_control(&summary_file(nonce), summary)
            .await?;
        self.backfill.saved.push(nonce);
        Ok(())
    }

    /// The chunk saved under `nonce`, if it was.
    pub(super) async fn load_chunk(&mut self, nonce: u64) -> Result<Option<Prepared>, JobError> {
        let Some(summary) = self.store.get_control(&summary_file(nonce)).await? else {
            return Ok(None);
        };
        let summary: Summary = serde_json::from_slice(&summary).map_err(|e| {
            JobError::Restore(format!(
                "saved backfill chunk {nonce:016x} is unreadable: {e}"
            ))
        })?;
        let rows = self
            .store
            .get_control(&rows_file(nonce))
            .await?
            .ok_or_else(|| {
                JobError::Restore(format!("saved backfill chunk {nonce:016x} lost its rows"))
            })?;
        let table = self.backfill_table()?;
        let schema = self.plan.sources[table.source].schema.clone();
        let batches = decode_ipc(rows).map_err(JobError::state("backfill chunk"))?;
        let rows = arrow::compute::concat_batches(&schema, &batches).map_err(JobError::Arrow)?;
        self.backfill.saved.push(nonce);
        tracing::info!(chunk = %format!("{nonce:016x}"), rows = rows.num_rows(), "a backfill chunk emitted before a restart is emitted again, as it was");
        Ok(Some(Prepared { rows, summary }))
    }

    /// Deletes the files of chunks saved by earlier runs that no watermark
    /// will bring back: called once the stream has delivered everything
    /// before this run's start, so each earlier chunk whose high watermark
    /// the checkpoint did not cover has been loaded again (and is in
    /// `saved`). What is left was covered by a checkpoint whose run
    /// stopped before it deleted the files. Returns how many went.
    pub(super) async fn sweep_chunks(&mut self) -> Result<usize, JobError> {
        let mut swept = 0;
        for name in self.store.control_files(PREFIX).await? {
            let nonce = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('.').next())
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            if nonce.is_some_and(|nonce| !self.backfill.saved.contains(&nonce)) {
                self.store.delete_control(&name).await?;
                swept += 1;
            }
        }
        Ok(swept)
    }

    /// Deletes the files of a chunk a checkpoint covers.
    pub(super) async fn forget_chunk(&mut self, nonce: u64) -> Result<(), JobError> {
        self.store.delete_control(&summary_file(nonce)).await?;
        self.store.delete_control(&rows_file(nonce)).await?;
        Ok(())
    }
}

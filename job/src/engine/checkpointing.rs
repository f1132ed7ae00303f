//! Checkpoints of a running job: the barrier through the sinks, the
//! manifest, the commit, and the restore of dimension tables (see the
//! engine's module docs for the order and what each step guarantees).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;

use super::{Engine, JobError};
use crate::change::format_lsn;
use crate::checkpoint::{self, CheckpointStore, Manifest, SourceState, StateFile};
use crate::sink::task::SinkTask;
use crate::sink::SinkState;
use crate::sql::plan::JobPlan;

impl Engine {
    /// Takes checkpoint `epoch + 1`. The caller confirms the slot afterwards.
    pub(super) async fn checkpoint(&mut self) -> Result<(), JobError> {
        let epoch = self.epoch + 1;
        let started = Instant::now();
        // The barrier goes to every sink at once; each answers once it has
        // applied what it was sent before it.
        let all = self.all_sinks();
        let names: Vec<String> = all.iter().map(|sink| sink.name().to_string()).collect();
        let prepared = futures::future::try_join_all(
            all.into_iter().map(|sink| sink.prepare_checkpoint(epoch)),
        )
        .await?;
        let barrier_ms = started.elapsed().as_millis() as u64;
        let sinks: BTreeMap<String, SinkState> = names.into_iter().zip(prepared).collect();
        let now_ms = crate::engine::latency::unix_ms() as u64;
        for (index, name) in self.stats.sink_names.iter().enumerate() {
            let detached = sinks.get(name).is_some_and(|state| state.detached);
            self.stats.set_detached(index, detached, now_ms);
            if detached {
                // What the sink holds, not what it was sent.
                let held = sinks[name].position.lsn;
                self.stats.sink_lsn[index].store(held, Ordering::Relaxed);
            }
        }
        self.held_by = sinks
            .iter()
            .filter(|(_, state)| state.detached)
            .map(|(name, state)| (name.clone(), state.position))
            .min_by_key(|(_, position)| *position);
        let (mut files, capture_files, capture_order) = self
            .capture
            .finish()
            .await
            .map_err(JobError::state("failed to close the capture log"))?;
        let mut dimensions = BTreeMap::new();
        for (index, dimension) in self.dimensions.iter().enumerate() {
            let Some(dimension) = dimension else { continue };
            let source = &self.plan.sources[index];
            let state = StateFile::encode(
                format!("dimension-{}.arrows", source.def.name),
                &source.schema,
                std::slice::from_ref(dimension.contents()),
                &mut files,
            )
            .map_err(JobError::state(format!(
                "failed to encode dimension `{}`",
                source.def.name
            )))?;
            dimensions.insert(source.def.name.clone(), state);
        }
        let windows = self.snapshot_windows(epoch, &mut files)?;
        let window_outputs = self.snapshot_window_outputs(&mut files)?;
        let manifest = Manifest {
            format: checkpoint::FORMAT,
            job: self.job.clone(),
            epoch,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            source: SourceState::new(
                &self.slot,
                self.resume_lsn,
                self.position,
                self.backfill.origin.clone(),
            ),
            sinks: sinks.clone(),
            dimensions,
            capture_files,
            capture_order,
            sql_hash: self.sql_hash.clone(),
            udfs: self.udf_hashes(),
            windows,
            window_outputs,
            kept: checkpoint::Kept::Everything,
            backfill: self.backfill_for_checkpoint(),
            backfills: self.backfill.finished.clone(),
        };
        let bytes: usize = files.iter().map(|(_, bytes)| bytes.len()).sum();
        let state_ms = started.elapsed().as_millis() as u64 - barrier_ms;
        self.store.write(&manifest, files).await?;
        crate::failpoint::hit("before_sink_commit");
        futures::future::try_join_all(self.all_sinks().into_iter().map(|sink| {
            let state = &sinks[sink.name()];
            sink.commit(state)
        }))
        .await?;
        self.epoch = epoch;
        self.dirty = false;
        self.stats.checkpoint_epoch.store(epoch, Ordering::Relaxed);
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.stats
            .checkpoint_resume_lsn
            .store(self.resume_lsn, Ordering::Relaxed);
        self.stats
            .checkpoint_bytes
            .store(bytes as u64, Ordering::Relaxed);
        self.stats
            .checkpoint_seconds
            .observe(started.elapsed().as_secs_f64());
        self.stats.checkpoint_unix_ms.store(
            chrono::Utc::now().timestamp_millis() as u64,
            Ordering::Relaxed,
        );
        // Like the slot's own confirmation, it never moves back (a detached
        // sink that never wrote holds position 0).
        self.stats
            .confirmed_lsn
            .fetch_max(self.confirm_lsn(), Ordering::Relaxed);
        tracing::debug!(
            epoch,
            resume_lsn = %format_lsn(self.resume_lsn),
            elapsed_ms = started.elapsed().as_millis() as u64,
            barrier_ms,
            state_ms,
            bytes,
            "checkpoint written"
        );
        self.store
            .prune(
                self.retention,
                self.held_by.as_ref().map(|(_, position)| *position),
                chrono::Utc::now(),
            )
            .await?;
        self.backfill_checkpointed().await
    }

    /// Where the slot may be confirmed: the checkpoint's resume LSN, or less
    /// while a detached sink holds less.
    pub(super) fn confirm_lsn(&self) -> u64 {
        match &self.held_by {
            Some((_, position)) => self.resume_lsn.min(position.lsn),
            None => self.resume_lsn,
        }
    }

    /// Every sink, read only: the queries', then the side outputs.
    pub(super) fn each_sink(&self) -> impl Iterator<Item = &SinkTask> {
        self.sinks
            .iter()
            .chain(self.late_sink.as_ref())
            .chain(self.dead_letter_sink.as_ref())
    }

    /// Every sink: the queries', then the side outputs.
    pub(super) fn all_sinks(&mut self) -> Vec<&mut SinkTask> {
        self.sinks
            .iter_mut()
            .chain(self.late_sink.as_mut())
            .chain(self.dead_letter_sink.as_mut())
            .collect()
    }

    /// Stops every sink's task (after the final checkpoint, or a failure).
    pub(super) async fn close_sinks(&mut self) {
        let sinks = std::mem::take(&mut self.sinks)
            .into_iter()
            .chain(self.late_sink.take())
            .chain(self.dead_letter_sink.take());
        for sink in sinks {
            sink.close().await;
        }
    }

    pub(super) async fn restore_dimensions(&mut self, manifest: &Manifest) -> Result<(), JobError> {
        for (index, dimension) in self.dimensions.iter_mut().enumerate() {
            let Some(dimension) = dimension else { continue };
            let name = &self.plan.sources[index].def.name;
            let file = manifest.dimensions.get(name).ok_or_else(|| {
                JobError::Restore(format!(
                    "`{name}` is read as a dimension but checkpoint {} holds no copy of it (it was added to the SQL \
                     later); run the job under a new name to load it from a fresh snapshot",
                    manifest.epoch
                ))
            })?;
            let what = format!("dimension `{name}`");
            for batch in read_state(&self.store, manifest.epoch, file, what).await? {
                dimension.apply(&batch).map_err(JobError::Arrow)?;
            }
        }
        Ok(())
    }
}

/// The batches of state file `file` of checkpoint `epoch`, read back;
/// `what` names the state in errors.
pub(super) async fn read_state(
    store: &CheckpointStore,
    epoch: u64,
    file: &StateFile,
    what: String,
) -> Result<Vec<RecordBatch>, JobError> {
    let bytes = store.read_file(epoch, &file.file).await?;
    checkpoint::decode_ipc(bytes).map_err(JobError::state(what))
}

/// The checkpoint `engage replay --from-checkpoint epoch` starts from: whole,
/// or thinned to a base (its dimension tables are still there).
pub(super) async fn replay_start(
    store: &CheckpointStore,
    epoch: u64,
) -> Result<checkpoint::Manifest, JobError> {
    let manifest = store.load(epoch).await?;
    if manifest.holds_dimensions() {
        return Ok(manifest);
    }
    let bases: Vec<u64> = store
        .list()
        .await?
        .iter()
        .filter(|m| m.holds_dimensions())
        .map(|m| m.epoch)
        .collect();
    let before = bases.iter().rev().find(|&&b| b < epoch);
    let suggestion = match before {
        Some(base) => format!("the nearest before it is {base}"),
        None => format!("the oldest is {}", bases.first().copied().unwrap_or(epoch)),
    };
    Err(JobError::Restore(format!(
        "checkpoint {epoch} keeps only its captured changes (it is older than the checkpoints kept whole, \
         --keep-checkpoints), so a replay cannot start there. Start from a checkpoint that still holds its \
         dimension tables (`engage checkpoints` marks them `whole` or `base`): {suggestion}"
    )))
}

/// The shortest default capture retention.
pub const MIN_CAPTURE_RETENTION: Duration = Duration::from_secs(60 * 60);

/// Captures are kept for the job's longest window (at least an hour): a
/// sink rebuilt from them gets every change its windows could still show.
pub(super) fn default_capture_retention(plan: &JobPlan) -> Duration {
    let longest_us = plan
        .queries
        .iter()
        .flat_map(|q| &q.windows)
        .map(|w| w.kind.width())
        .max()
        .unwrap_or(0);
    Duration::from_micros(longest_us.max(0) as u64).max(MIN_CAPTURE_RETENTION)
}

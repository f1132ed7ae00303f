//! Changes that come again: captured changes replayed from checkpoints
//! (`engage replay`, and the rebuild of a sink whose store lost its data), and
//! changes the source re-sends after a restart.
//!
//! # Rebuilding a lost Redis sink
//!
//! A Redis that restarts without its data (no persistence, a lost disk, a
//! `FLUSHALL`) no longer holds the sink's position key, or holds an older one
//! than the checkpoint recorded. Streaming on would serve an undercount, so at
//! start the engine refills such a sink first: it takes the newest retained
//! checkpoint at or below what Redis still holds, loads that checkpoint's
//! dimension tables, and pushes the captured changes of every later epoch
//! through the sink's query alone (windows, side outputs and other sinks are
//! untouched). Streaming then resumes as usual. If no retained checkpoint is
//! old enough (they were pruned), the job stops and says how to recover
//! rather than serve partial keys.
//!
//! A windowed Redis sink is rewritten instead with the last window it was
//! written before that checkpoint (every checkpoint keeps it); the windows
//! after it come again as the job streams on. Waiting for the next window to
//! close would leave, say, a 24-hour KPI missing for up to a day.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use arrow::record_batch::RecordBatch;

use super::checkpointing::read_state;
use super::{after, Engine, JobError, BEFORE_SUFFIX};
use crate::change::Position;
use crate::checkpoint::Manifest;

impl Engine {
    /// Pushes the captured changes of epochs `from + 1 ..= to` through the queries.
    pub(super) async fn replay(&mut self, from: u64, to: u64) -> Result<u64, JobError> {
        let mut replayed = 0;
        for epoch in from + 1..=to {
            let Some(manifest) = self.store.load_complete(epoch).await? else {
                continue;
            };
            let mut batches: BTreeMap<String, std::vec::IntoIter<RecordBatch>> = BTreeMap::new();
            for (table, file) in &manifest.capture_files {
                let what = format!("capture of `{table}`");
                let decoded = read_state(&self.store, epoch, file, what).await?;
                batches.insert(table.clone(), decoded.into_iter());
            }
            let mut before = None;
            for (table, _) in &manifest.capture_order {
                let Some(batch) = batches.get_mut(table).and_then(|b| b.next()) else {
                    return Err(JobError::Restore(format!(
                        "capture of checkpoint {epoch} is missing batches of `{table}`"
                    )));
                };
                if table.ends_with(BEFORE_SUFFIX) {
                    before = Some(batch);
                    continue;
                }
                let Some(source) = self.plan.sources.iter().position(|s| &s.def.name == table)
                else {
                    before = None;
                    continue; // a table the current SQL no longer reads
                };
                replayed += batch.num_rows() as u64;
                self.process(source, batch, before.take()).await?;
            }
            tracing::info!(epoch, "replayed captured changes");
        }
        Ok(replayed)
    }

    /// Refills every sink that found its store holding less than the
    /// checkpoint `latest` recorded (see the module docs): a windowed sink
    /// gets the last window it held back; the others the captured changes.
    pub(super) async fn rebuild_lost_sinks(&mut self, latest: &Manifest) -> Result<(), JobError> {
        let (mut lost, mut lost_windows) = (Vec::new(), Vec::new());
        for (index, sink) in self.sinks.iter().enumerate() {
            if !sink.lost() {
                continue;
            }
            if self.plan.queries[index].is_windowed() {
                lost_windows.push(index);
                continue;
            }
            lost.push(index);
        }
        for index in lost_windows {
            let name = self.sinks[index].name().to_string();
            if self.rewrite_lost_window(index).await? {
                tracing::warn!(sink = %name, "windowed sink lost its keys; rewrote the last window it held");
            } else {
                tracing::warn!(sink = %name, "windowed sink lost its keys; the next closed window rewrites them");
            }
        }
        let Some(floor) = lost.iter().map(|&i| self.sinks[i].position()).min() else {
            return Ok(());
        };
        let names: Vec<&str> = lost.iter().map(|&i| self.sinks[i].name()).collect();
        let names = names.join(", ");
        let base = self
            .store
            .newest_where(|m| m.source.position <= floor && m.holds_dimensions())
            .await?;
        let Some(base) = base else {
            let retained = self.store.list().await?;
            let oldest = retained
                .iter()
                .find(|m| m.holds_dimensions())
                .map(|m| m.epoch)
                .unwrap_or(latest.epoch);
            return Err(JobError::Restore(format!(
                "the store of sink(s) {names} lost what they had applied (it holds position {floor}), and the \
                 oldest retained checkpoint a rebuild can start from ({oldest}) is newer than that, so they cannot \
                 be rebuilt exactly. To refill them with the changes still captured, run `engage replay \
                 --from-checkpoint {oldest}`; keep captures longer (--capture-retention) to make this automatic"
            )));
        };
        tracing::warn!(sinks = %names, from_checkpoint = base.epoch, to_checkpoint = latest.epoch, "rebuilding sinks whose store lost its data");
        // The dimensions as of `latest` (already restored), put back afterwards.
        let current: Vec<Option<RecordBatch>> = self
            .dimensions
            .iter()
            .map(|d| d.as_ref().map(|d| d.contents().clone()))
            .collect();
        for dimension in self.dimensions.iter_mut().flatten() {
            dimension.clear();
        }
        // An error ends the run, and the engine with it: nothing to undo then.
        self.restore_dimensions(&base).await?;
        self.rebuilding = Some(lost);
        let replayed = self.replay(base.epoch, latest.epoch).await?;
        self.rebuilding = None;
        for (dimension, rows) in self.dimensions.iter_mut().zip(current) {
            if let (Some(dimension), Some(rows)) = (dimension, rows) {
                dimension.restore_contents(rows);
            }
        }
        tracing::info!(sinks = %names, changes = replayed, "sinks rebuilt from checkpoints");
        Ok(())
    }

    /// Drops the changes of a batch the engine has fully processed already (a
    /// transaction the source sends again after a reconnect), and counts the
    /// changes some sink already held.
    pub(super) fn drop_resent(
        &mut self,
        batch: RecordBatch,
        before: Option<RecordBatch>,
    ) -> Result<(RecordBatch, Option<RecordBatch>), JobError> {
        if batch.num_rows() == 0 || self.applied_upto == Position::ZERO {
            return Ok((batch, before));
        }
        let resent = count_at_or_below(&batch, self.applied_upto);
        if resent == 0 {
            return Ok((batch, before));
        }
        self.stats
            .resent_suppressed
            .fetch_add(resent, Ordering::Relaxed);
        if resent < batch.num_rows() as u64 || super::last_position(&batch) == self.applied_upto {
            tracing::info!(
                upto = %self.applied_upto,
                suppressed = self.stats.resent_suppressed.load(Ordering::Relaxed),
                "caught up with what the sinks held before the restart"
            );
        }
        let error = JobError::Arrow;
        let batch = after(&batch, self.position).map_err(error)?;
        let before = match before {
            Some(before) if before.num_rows() > 0 => {
                Some(after(&before, self.position).map_err(error)?)
            }
            other => other,
        };
        Ok((batch, before))
    }
}

/// Rows of a change batch at or below `position` (batches are in position order).
fn count_at_or_below(batch: &RecordBatch, position: Position) -> u64 {
    let (lsn, seq) = super::position_columns(batch);
    let at = |row: usize| Position::new(lsn.value(row) as u64, seq.value(row) as u64);
    let (mut low, mut high) = (0, batch.num_rows());
    while low < high {
        let mid = (low + high) / 2;
        if at(mid) <= position {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    low as u64
}

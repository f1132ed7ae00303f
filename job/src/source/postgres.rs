//! Where a run of a `postgres-cdc` job starts: the source's boundary.
//!
//! [`open`] connects, checks the server and the publication (see
//! [`setup::preflight`]), and decides from the job's newest checkpoint
//! and its replication slot where the stream starts:
//!
//! - neither exists: a new slot is created, and the dimension tables are read
//!   from the snapshot it exports, consistent with the slot's first LSN
//!   ([`Start::Fresh`]);
//! - both exist and agree: the stream resumes at the checkpoint's LSN
//!   ([`Start::Resume`]);
//! - anything else stops the job with what happened and how to recover: a
//!   slot without checkpoints, checkpoints without their slot, a slot
//!   Postgres invalidated, or one confirmed past the newest checkpoint (a gap).
//!
//! The engine then restores or loads its state and calls
//! [`PostgresSource::stream`]. Other sources (a Kafka topic, a backfill
//! reader) are meant to plug in beside this one with the same two steps.

use arrow::record_batch::RecordBatch;

use super::replication::{self, BatchOptions, SourceError, SourceHandle};
use super::setup::{self, NewSlot, PgTarget, SlotNames};
use super::{snapshot, RejectedChange};
use crate::change::format_lsn;
use crate::sql::plan::SourceTable;

/// What the job's newest checkpoint says about the source.
#[derive(Debug, Clone, Copy)]
pub struct Checkpointed {
    pub epoch: u64,
    /// End LSN of the last commit the checkpoint covers.
    pub resume_lsn: u64,
}

/// Where the stream of a run starts.
pub enum Start {
    /// A new slot, streaming from `lsn`; per dimension source (its index),
    /// the rows of the slot's snapshot and those the declared types cannot hold.
    Fresh {
        lsn: u64,
        snapshots: Vec<(usize, RecordBatch, Vec<RejectedChange>)>,
        origin: crate::checkpoint::StreamOrigin,
    },
    /// The checkpoint and the slot agree: resume at the checkpoint's LSN.
    Resume,
}

/// An opened Postgres source, ready to stream.
pub struct PostgresSource {
    target: PgTarget,
    names: SlotNames,
    /// A plain connection for control queries (how far behind the server).
    pub control: tokio_postgres::Client,
    /// The slot created by [`open`], which streams from its snapshot's LSN.
    new_slot: Option<NewSlot>,
}

/// Opens the source of `job` reading `sources` (see the module docs).
/// `windowed` names, per source, the windowed sinks it drives (preflight
/// checks their tables' replica identity); `checkpoints` is where the
/// checkpoints live, for the messages.
pub async fn open(
    job: &str,
    sources: &[SourceTable],
    windowed: &[Vec<String>],
    latest: Option<Checkpointed>,
    checkpoints: &str,
) -> Result<(PostgresSource, Start), SourceError> {
    let connection = sources
        .iter()
        .find_map(setup::cdc_options)
        .ok_or(SourceError::NoSource)?
        .connection
        .clone();
    let target = PgTarget::parse(connection.expose())?;
    let control = target.connect().await?;
    let names = SlotNames::for_job(job, sources);
    setup::preflight(&target, &control, sources, windowed, &names).await?;
    let slot = setup::slot_status(&target, &control, &names.slot).await?;
    let resume = |message: String| Err(SourceError::Resume(message));
    let (new_slot, start) = match (latest, &slot) {
        (None, None) => {
            let new_slot = NewSlot::create(&target, &names).await?;
            let origin = snapshot::origin(&target, &control, &new_slot.snapshot).await?;
            let mut snapshots = Vec::new();
            for (index, source) in sources.iter().enumerate() {
                if source.is_dimension {
                    let (rows, rejected) = snapshot::load_table(
                        &target,
                        &control,
                        source,
                        &new_slot.snapshot,
                        new_slot.consistent_lsn,
                    )
                    .await?;
                    snapshots.push((index, rows, rejected));
                }
            }
            let lsn = new_slot.consistent_lsn;
            (
                Some(new_slot),
                Start::Fresh {
                    lsn,
                    snapshots,
                    origin,
                },
            )
        }
        (None, Some(_)) => {
            return resume(format!(
                "replication slot `{}` exists but job `{job}` has no checkpoint in {checkpoints}: the slot's \
                 position cannot be trusted. If this job never ran with these checkpoints, drop the slot \
                 (SELECT pg_drop_replication_slot('{}')) and start again; otherwise restore the checkpoint directory",
                names.slot, names.slot
            ))
        }
        (Some(latest), None) => {
            return resume(format!(
                "job `{job}` has checkpoints (newest: {}) but its replication slot `{}` is gone, so the changes \
                 since that checkpoint cannot be read again. To start over, move {checkpoints} away; the sinks will \
                 then receive only changes committed after the new start",
                latest.epoch, names.slot
            ))
        }
        (Some(latest), Some(status)) => {
            if status.wal_status.as_deref() == Some("lost") {
                return resume(format!(
                    "replication slot `{}` was invalidated by postgres (wal_status = lost: it retained more WAL \
                     than max_slot_wal_keep_size allows), so changes after checkpoint {} are gone. Recover by moving \
                     {checkpoints} away and dropping the slot (SELECT pg_drop_replication_slot('{}')), then re-run: \
                     the job starts from a fresh snapshot",
                    names.slot, latest.epoch, names.slot
                ));
            }
            if status.plugin != "pgoutput" {
                return resume(format!(
                    "replication slot `{}` uses plugin `{}`; engage needs pgoutput",
                    names.slot, status.plugin
                ));
            }
            if let Some(confirmed) = status.confirmed_flush_lsn {
                if confirmed > latest.resume_lsn {
                    return resume(format!(
                        "replication slot `{}` is confirmed up to {} but the newest checkpoint ({}) resumes at {}: \
                         the changes in between were acknowledged without being checkpointed (was the slot used by \
                         another consumer, or the checkpoints restored from an older copy?), so the sinks would \
                         miss them. Restore the checkpoint directory that matches the slot, or start over from a \
                         fresh snapshot: move {checkpoints} away and drop the slot \
                         (SELECT pg_drop_replication_slot('{}'))",
                        names.slot,
                        format_lsn(confirmed),
                        latest.epoch,
                        format_lsn(latest.resume_lsn),
                        names.slot
                    ));
                }
            }
            (None, Start::Resume)
        }
    };
    let source = PostgresSource {
        target,
        names,
        control,
        new_slot,
    };
    Ok((source, start))
}

impl PostgresSource {
    /// The job's replication slot.
    pub fn slot(&self) -> &str {
        &self.names.slot
    }

    /// Drops the slot [`open`] created in this run, when the run fails
    /// before it streamed (a sink that cannot open, say): the job has no
    /// checkpoint, so nothing depends on the slot, and left behind it would
    /// make the next start refuse ("exists but ... has no checkpoint").
    /// Does nothing for a slot that existed before. Best effort: a failure
    /// is logged, and the error that ended the run is what the user sees.
    pub async fn abandon_new_slot(&mut self) {
        let Some(mut new_slot) = self.new_slot.take() else {
            return;
        };
        // The creating session holds the slot (and its snapshot) until it
        // ends; it waits at a gate that a graceful stop does not open.
        new_slot.client.abort();
        drop(new_slot);
        let slot = &self.names.slot;
        for _ in 0..50 {
            let dropped = self
                .control
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND NOT active",
                    &[slot],
                )
                .await;
            match dropped {
                Ok(1) => {
                    tracing::info!(slot = %slot, "dropped the replication slot this first start created");
                    return;
                }
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                Err(error) => {
                    tracing::warn!(slot = %slot, error = %error, "could not drop the replication slot this first start created");
                    return;
                }
            }
        }
        tracing::warn!(slot = %slot, "the replication slot this first start created is still in use; drop it before the next start");
    }

    /// Starts streaming: from the new slot's snapshot LSN, or else from
    /// `resume_lsn`; until `end_lsn`, if given.
    pub async fn stream(
        &mut self,
        sources: &[SourceTable],
        resume_lsn: u64,
        end_lsn: Option<u64>,
        batching: BatchOptions,
    ) -> Result<SourceHandle, SourceError> {
        replication::start(
            &self.target,
            &self.names,
            sources,
            self.new_slot.take(),
            resume_lsn,
            end_lsn,
            batching,
        )
        .await
    }
}

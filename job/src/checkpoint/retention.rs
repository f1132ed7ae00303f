//! What a job keeps of its older checkpoints.
//!
//! Checkpoints age through three tiers:
//!
//! 1. **Whole.** The newest `keep` checkpoints (`--keep-checkpoints`) hold
//!    everything: dimension tables, window state, the last window of each
//!    windowed sink and the capture of their epoch. A job resumes from the
//!    newest; `engage replay` can start from any of them. Window state is
//!    written as changes over earlier checkpoints' files (at most
//!    `WHOLE_EVERY` layers), so the checkpoints those files are in stay
//!    whole too while a whole one builds on them.
//! 2. **Thinned.** An older checkpoint younger than the capture retention
//!    (`--capture-retention`) keeps its manifest and its capture, the changes
//!    read during its epoch. Its window state goes. Its dimension tables stay
//!    at *bases*: the first checkpoint of every [`BASE_EVERY`] span of time,
//!    and any checkpoint a detached sink will be caught up from. A base is
//!    where a sink is rebuilt from: its dimension tables, then every later
//!    capture, replayed through the sink's query. So a Redis that lost its data,
//!    or a sink added to the SQL, can be refilled from far further back than
//!    `keep` checkpoints, at the cost of the capture's size on disk.
//! 3. **Gone.** Older than the capture retention, and not needed by a
//!    detached sink: deleted.
//!
//! A thinned checkpoint says so in its manifest ([`Kept`]), which is rewritten
//! (one atomic `put`) before the files it no longer names are deleted: a crash
//! between the two leaves unreferenced files, never a manifest naming a file
//! that is gone.
//!
//! Pruning runs after every checkpoint and reads only the manifests it may
//! change: the newest `keep`, the checkpoints that just left them, and the
//! oldest ones that may have expired. A day of one-second checkpoints does not
//! make it read 86,400 manifests each time.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{CheckpointError, CheckpointStore, Manifest};
use crate::change::Position;

/// Thinned checkpoints keep their dimension tables once per this span: a
/// rebuild replays at most this much captured history beyond what it needs.
pub const BASE_EVERY: Duration = Duration::from_secs(10 * 60);

/// What a job keeps of its checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The newest checkpoints kept whole.
    pub keep: usize,
    /// How long older checkpoints keep their captured changes.
    pub capture: Duration,
}

/// What a checkpoint still holds (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    /// Everything: a job can resume from it.
    #[default]
    Everything,
    /// Its capture and dimension tables: a base, where a rebuild or a replay
    /// of sinks that are not windowed can start.
    CaptureAndDimensions,
    /// Its capture only: replayed as part of a rebuild from an older base.
    Capture,
}

impl Kept {
    pub fn is_everything(&self) -> bool {
        *self == Kept::Everything
    }

    /// A short word for `engage checkpoints`.
    pub fn label(&self) -> &'static str {
        match self {
            Kept::Everything => "whole",
            Kept::CaptureAndDimensions => "base",
            Kept::Capture => "capture",
        }
    }
}

impl Manifest {
    /// Whether a rebuild (or a replay) can start here: the dimension tables
    /// as of this checkpoint are still on disk.
    pub fn holds_dimensions(&self) -> bool {
        self.kept != Kept::Capture
    }

    fn created(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.created_at)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// Which [`BASE_EVERY`] span the checkpoint was taken in.
    fn base_span(&self) -> Option<i64> {
        self.created()
            .map(|t| t.timestamp().div_euclid(BASE_EVERY.as_secs() as i64))
    }

    /// The oldest checkpoint whose window files this one builds on
    /// (`u64::MAX`: none).
    fn oldest_layer(&self) -> u64 {
        let bases = self.windows.values().flat_map(|w| &w.base);
        bases.map(|b| b.epoch).min().unwrap_or(u64::MAX)
    }

    /// Every file the manifest names.
    fn files(&self) -> BTreeSet<String> {
        self.dimensions
            .values()
            .chain(self.capture_files.values())
            .chain(self.windows.values().map(|w| &w.state))
            .chain(self.window_outputs.values().map(|w| &w.state))
            .map(|f| f.file.clone())
            .collect()
    }
}

impl CheckpointStore {
    /// Applies `retention` (see the module docs) at time `now`. `floor` is the
    /// position a detached sink holds: the newest checkpoint at or below it
    /// keeps its dimension tables, and neither it nor any later capture expires.
    pub async fn prune(
        &self,
        retention: Retention,
        floor: Option<Position>,
        now: DateTime<Utc>,
    ) -> Result<(), CheckpointError> {
        let epochs = self.epochs().await?;
        // The newest `keep` complete checkpoints stay whole, and so do the
        // older ones whose window files they build on (incremental window
        // state: WindowCheckpoint::base).
        let mut whole = 0;
        let mut below = epochs.len();
        let mut needed = u64::MAX;
        while below > 0 && whole < retention.keep.max(1) {
            below -= 1;
            if let Some(manifest) = self.load_complete(epochs[below]).await? {
                whole += 1;
                needed = needed.min(manifest.oldest_layer());
            }
        }
        // Those stay whole in turn, with what they build on (one state's
        // older layers can start before another's newer ones; all start at or
        // after the last epoch that is a multiple of WHOLE_EVERY, so this
        // stops within that many checkpoints).
        while below > 0 && epochs[below - 1] >= needed {
            below -= 1;
            if let Some(manifest) = self.load_complete(epochs[below]).await? {
                needed = needed.min(manifest.oldest_layer());
            }
        }
        let older = &epochs[..below];
        let expired = self.expire(older, retention.capture, floor, now).await?;
        self.thin(&older[expired..], floor).await
    }

    /// Deletes the oldest of `older` that are past the capture retention (and
    /// incomplete ones), stopping at the first that is not; returns how many
    /// it deleted.
    async fn expire(
        &self,
        older: &[u64],
        capture: Duration,
        floor: Option<Position>,
        now: DateTime<Utc>,
    ) -> Result<usize, CheckpointError> {
        // No cutoff (a retention too long to subtract): nothing expires.
        let cutoff = chrono::Duration::from_std(capture)
            .ok()
            .and_then(|span| now.checked_sub_signed(span));
        // (index, manifest) of each expired checkpoint, then of the first one
        // that is not (it bounds where a detached sink's base can be).
        let mut loaded: Vec<(usize, Manifest)> = Vec::new();
        let mut incomplete = Vec::new();
        let mut expired = older.len();
        for (index, &epoch) in older.iter().enumerate() {
            let Some(manifest) = self.load_complete(epoch).await? else {
                incomplete.push(index);
                continue;
            };
            let past = match (manifest.created(), cutoff) {
                (Some(created), Some(cutoff)) => created < cutoff,
                // A time that does not parse cannot be younger than anything.
                (None, Some(_)) => true,
                (_, None) => false,
            };
            loaded.push((index, manifest));
            if !past {
                expired = index;
                break;
            }
        }
        // A detached sink is caught up from the newest base at or below what
        // it holds: that base and everything after it stay.
        if let Some(floor) = floor {
            if let Some((index, _)) = loaded
                .iter()
                .rev()
                .find(|(_, m)| m.source.position <= floor && m.holds_dimensions())
            {
                expired = expired.min(*index);
            }
        }
        for &index in incomplete.iter().filter(|&&i| i < expired) {
            self.delete_epoch(older[index]).await?;
        }
        for (index, _) in loaded.iter().filter(|(i, _)| *i < expired) {
            self.delete_epoch(older[*index]).await?;
        }
        Ok(expired)
    }

    /// Thins the newest of `older` that are still whole, down to the first
    /// that is thinned already (the ones below it were thinned before).
    async fn thin(&self, older: &[u64], floor: Option<Position>) -> Result<(), CheckpointError> {
        let mut next: Option<Manifest> = None;
        for index in (0..older.len()).rev() {
            let manifest = match next.take() {
                Some(manifest) => manifest,
                None => match self.load_complete(older[index]).await? {
                    Some(manifest) => manifest,
                    None => {
                        self.delete_epoch(older[index]).await?;
                        continue;
                    }
                },
            };
            if !manifest.kept.is_everything() {
                return Ok(());
            }
            // The checkpoint before it decides whether it opens a new span.
            let previous = match index.checked_sub(1) {
                Some(previous) => self.load_complete(older[previous]).await?,
                None => None,
            };
            let base = previous
                .as_ref()
                .is_none_or(|p| p.base_span() != manifest.base_span())
                || floor.is_some_and(|floor| manifest.source.position <= floor);
            self.thin_one(manifest, base).await?;
            next = previous;
        }
        Ok(())
    }

    /// Rewrites one checkpoint's manifest as thinned, then deletes the files
    /// it no longer names.
    async fn thin_one(&self, mut manifest: Manifest, base: bool) -> Result<(), CheckpointError> {
        let before = manifest.files();
        manifest.windows.clear();
        manifest.window_outputs.clear();
        if base {
            manifest.kept = Kept::CaptureAndDimensions;
        } else {
            manifest.dimensions.clear();
            manifest.kept = Kept::Capture;
        }
        self.write(&manifest, Vec::new()).await?;
        for file in before.difference(&manifest.files()) {
            self.delete_file(manifest.epoch, file).await?;
        }
        Ok(())
    }
}

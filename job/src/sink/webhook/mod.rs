//! The webhook sink (`connector = 'webhook'`): rows POSTed as JSON to an HTTP
//! endpoint in batches, each signed as Standard Webhooks specify.
//!
//! # Delivery: at least once, under ids a receiver can de-duplicate on
//!
//! An HTTP endpoint has no position the sink could read back (as Redis and
//! Kafka have), so a replay re-sends. What the sink guarantees instead is
//! that a row is only ever sent inside **the same batch under the same
//! `webhook-id`**, however often it is sent: a receiver that keeps the ids it
//! has processed gets an exactly-once effect.
//!
//! For that, a batch's bounds must come from the source positions alone,
//! never from timing. Rows arrive in position order ([`crate::change`]); a
//! batch is *cut* when
//!
//! 1. it holds `webhook.batch_size` rows, or
//! 2. a checkpoint is taken (so rows never wait longer than a checkpoint
//!    interval at a low rate).
//!
//! A cut of the first kind is a function of the rows since the previous cut.
//! A cut of the second kind depends on when the checkpoint came, so it must
//! be durable before any batch that depends on it leaves: every batch cut
//! after checkpoint *e*'s barrier (including the one the barrier cut) waits
//! until checkpoint *e*'s manifest is written ([`Sink::commit`]). Then after
//! a crash the job resumes from a checkpoint whose cut the earlier run also
//! made, and replays the same rows into the same batches. A batch's id is a
//! hash of the job, the sink and the positions of its first and last rows.
//!
//! The checkpoint records every batch cut but not yet acknowledged (at most
//! `webhook.max_in_flight` plus one in-between ones, bounded), with its
//! rows; a restored sink sends them again first, under their ids.
//!
//! A batch the endpoint refuses (a 4xx other than 408 and 429) goes to the
//! job's `dead_letter` table, one row per row of the batch with reason
//! `webhook_rejected:<status>`; the refusal is recorded in the next
//! checkpoint and the dead-letter file is written at its commit, under a name
//! derived from the batch id, so a replay writes the same file again rather
//! than a second one. Without a `dead_letter` table a refusal stops the job.
//!
//! Requests in flight are bounded (`webhook.max_in_flight`); when they are
//! all waiting, the sink's writes wait, and so does the job: a slow endpoint
//! slows the job (the sink's lag shows it) and never fills memory.

mod dead_letter;
pub mod deliver;

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::kafka::encode;
use super::{SinkError, SinkState};
use crate::change::{Position, LSN_COLUMN, SEQ_COLUMN};
use crate::sql::options::{FilesystemOptions, KafkaFormat, WebhookOptions};
use crate::sql::plan::QueryPlan;
use deliver::Outcome;

/// One row of a batch: its position and its JSON object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookRow {
    pub position: Position,
    pub json: String,
}

/// A batch cut and not yet acknowledged, as a checkpoint records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookBatch {
    /// The `webhook-id`.
    pub id: String,
    pub rows: Vec<WebhookRow>,
}

/// A batch the endpoint refused, waiting to be written to `dead_letter`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefusedBatch {
    pub batch: WebhookBatch,
    pub status: u16,
    /// The first KiB of the response body.
    pub response: String,
}

/// A cut batch and where its delivery stands.
struct Pending {
    batch: Arc<WebhookBatch>,
    /// The checkpoint cut this batch depends on: it may leave once that
    /// checkpoint is committed.
    gate: u64,
    sent: bool,
    done: bool,
}

pub struct WebhookSink {
    job: String,
    name: String,
    options: Arc<WebhookOptions>,
    client: reqwest::Client,
    dead_letter: Option<dead_letter::Target>,
    /// Rows since the last cut, in position order.
    partial: Vec<WebhookRow>,
    outbox: VecDeque<Pending>,
    deliveries: JoinSet<(String, Outcome)>,
    refused: Vec<RefusedBatch>,
    /// Checkpoint cuts made in this run, and how many are committed.
    cuts: u64,
    committed_cuts: u64,
    position: Position,
    /// Every row up to here is acknowledged (or dead-lettered).
    visible: Position,
    rows_written: u64,
}

impl WebhookSink {
    /// Opens the sink; `restored`'s unacknowledged batches are sent again
    /// first and its refused ones written to `dead_letter`.
    pub async fn open(
        job: &str,
        name: &str,
        options: &WebhookOptions,
        dead_letter: Option<&FilesystemOptions>,
        query: &QueryPlan,
        restored: Option<&SinkState>,
    ) -> Result<WebhookSink, SinkError> {
        let permanent = |message: String| SinkError::Permanent {
            sink: name.to_string(),
            message,
        };
        options
            .check_columns(&query.output_schema, false)
            .map_err(permanent)?;
        // Redirects are not followed (Standard Webhooks: a 3xx is a failure;
        // following one could turn the POST into a GET elsewhere).
        let client = reqwest::Client::builder()
            .user_agent(concat!("engage/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| permanent(format!("cannot build the HTTP client: {}", e.without_url())))?;
        let dead_letter = dead_letter
            .map(|options| dead_letter::Target::new(name, options))
            .transpose()
            .map_err(permanent)?;
        let position = restored.map(|s| s.position).unwrap_or_default();
        let mut sink = WebhookSink {
            job: job.to_string(),
            name: name.to_string(),
            options: Arc::new(options.clone()),
            client,
            dead_letter,
            partial: Vec::new(),
            outbox: VecDeque::new(),
            deliveries: JoinSet::new(),
            refused: Vec::new(),
            cuts: 0,
            committed_cuts: 0,
            position,
            visible: position,
            rows_written: 0,
        };
        if let Some(state) = restored {
            sink.commit(state).await?;
            for batch in &state.outbox {
                sink.outbox.push_back(Pending {
                    batch: Arc::new(batch.clone()),
                    gate: 0,
                    sent: false,
                    done: false,
                });
            }
            sink.pump(false).await?;
        }
        Ok(sink)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn visible(&self) -> Position {
        self.visible
    }

    /// Rows the endpoint acknowledged in this run.
    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Adds the rows to the open batch, cuts full batches and sends what
    /// may leave. Waits while all `webhook.max_in_flight` requests are busy
    /// and more batches wait behind them.
    pub async fn write(
        &mut self,
        batches: Vec<RecordBatch>,
        upto: Position,
    ) -> Result<(), SinkError> {
        // One batch in position order, as the Kafka sink sends them.
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        if let Some(first) = batches.first() {
            let batch = arrow::compute::concat_batches(&first.schema(), &batches)
                .and_then(crate::change::in_position_order)
                .and_then(|b| encode::utc_timestamps(&b))
                .map_err(|e| self.permanent(format!("cannot encode the rows: {e}")))?;
            self.add_rows(&batch)?;
        }
        self.position = upto;
        self.pump(true).await
    }

    fn add_rows(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        let arrow_error = |e: arrow::error::ArrowError| SinkError::Permanent {
            sink: self.name.clone(),
            message: format!("cannot encode a row as JSON: {e}"),
        };
        let int64 = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>())
        };
        let (Some(lsn), Some(seq)) = (int64(LSN_COLUMN), int64(SEQ_COLUMN)) else {
            return Err(self.permanent(format!(
                "`{LSN_COLUMN}` and `{SEQ_COLUMN}` must be BIGINT columns of the query's output"
            )));
        };
        let rows = encode::row_struct(batch, KafkaFormat::Json);
        let (field, options) = encode::row_encoder_parts(&rows);
        let mut encoder = encode::row_encoder(&rows, &field, &options).map_err(arrow_error)?;
        let mut buffer = Vec::with_capacity(512);
        for row in 0..batch.num_rows() {
            buffer.clear();
            encoder.encode(row, &mut buffer);
            let json = String::from_utf8(std::mem::take(&mut buffer))
                .map_err(|_| self.permanent("the JSON encoder wrote invalid UTF-8".to_string()))?;
            self.partial.push(WebhookRow {
                position: Position::new(lsn.value(row) as u64, seq.value(row) as u64),
                json,
            });
            if self.partial.len() >= self.options.batch_size {
                self.cut();
            }
        }
        Ok(())
    }

    /// Closes the open batch (if it has rows) under the current gate.
    fn cut(&mut self) {
        if self.partial.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.partial);
        let id = batch_id(&self.job, &self.name, &rows);
        self.outbox.push_back(Pending {
            batch: Arc::new(WebhookBatch { id, rows }),
            gate: self.cuts,
            sent: false,
            done: false,
        });
    }

    /// Takes finished deliveries, then starts the batches that may leave.
    /// With `wait`, first waits for deliveries while the sendable batches
    /// not yet acknowledged exceed twice `webhook.max_in_flight`.
    async fn pump(&mut self, wait: bool) -> Result<(), SinkError> {
        loop {
            while let Some(finished) = self.deliveries.try_join_next() {
                self.finished(finished)?;
            }
            self.start_sendable();
            let waiting = self
                .outbox
                .iter()
                .filter(|p| !p.done && p.gate <= self.committed_cuts)
                .count();
            if !wait || waiting <= 2 * self.options.max_in_flight {
                return Ok(());
            }
            match self.deliveries.join_next().await {
                Some(finished) => self.finished(finished)?,
                None => return Ok(()),
            }
        }
    }

    fn start_sendable(&mut self) {
        let mut in_flight = self.deliveries.len();
        for pending in self.outbox.iter_mut() {
            if in_flight >= self.options.max_in_flight {
                break;
            }
            if pending.sent || pending.gate > self.committed_cuts {
                continue;
            }
            pending.sent = true;
            in_flight += 1;
            let (client, options, sink, batch) = (
                self.client.clone(),
                self.options.clone(),
                self.name.clone(),
                pending.batch.clone(),
            );
            self.deliveries.spawn(async move {
                let id = batch.id.clone();
                (id, deliver::deliver(client, options, sink, batch).await)
            });
        }
    }

    /// Records one delivery's end; acknowledged batches at the front of the
    /// outbox leave it and move [`WebhookSink::visible`].
    fn finished(
        &mut self,
        finished: Result<(String, Outcome), tokio::task::JoinError>,
    ) -> Result<(), SinkError> {
        let (id, outcome) =
            finished.map_err(|e| self.permanent(format!("a delivery task failed: {e}")))?;
        let Some(pending) = self.outbox.iter_mut().find(|p| p.batch.id == id) else {
            return Ok(());
        };
        pending.done = true;
        match outcome {
            Outcome::Delivered => self.rows_written += pending.batch.rows.len() as u64,
            Outcome::Refused { status, response } => {
                if self.dead_letter.is_none() {
                    return Err(self.permanent(format!(
                        "the endpoint refused batch {id} with status {status} ({}); declare a \
                         `dead_letter` filesystem table to keep refused rows and go on",
                        response.chars().take(200).collect::<String>()
                    )));
                }
                self.refused.push(RefusedBatch {
                    batch: pending.batch.as_ref().clone(),
                    status,
                    response,
                });
            }
        }
        while self.outbox.front().is_some_and(|p| p.done) {
            let done = self.outbox.pop_front().expect("front exists");
            if let Some(last) = done.batch.rows.last() {
                self.visible = self.visible.max(last.position);
            }
        }
        if self.outbox.is_empty() && self.partial.is_empty() {
            self.visible = self.position;
        }
        Ok(())
    }

    /// The engine calls this when no write came for a while: start what
    /// may leave and take finished deliveries.
    pub async fn idle(&mut self) -> Result<(), SinkError> {
        self.pump(false).await
    }

    /// Cuts the open batch; the state holds every batch not yet
    /// acknowledged and the refusals not yet dead-lettered.
    pub async fn prepare_checkpoint(&mut self, _epoch: u64) -> Result<SinkState, SinkError> {
        self.pump(false).await?;
        self.cuts += 1;
        self.cut();
        Ok(SinkState {
            position: self.position,
            outbox: self
                .outbox
                .iter()
                .filter(|p| !p.done)
                .map(|p| p.batch.as_ref().clone())
                .collect(),
            refused: self.refused.clone(),
            ..SinkState::default()
        })
    }

    /// The manifest holding `state` is durable: its refusals are written to
    /// `dead_letter` (idempotent) and the batches waiting on this
    /// checkpoint's cut may leave.
    pub async fn commit(&mut self, state: &SinkState) -> Result<(), SinkError> {
        if !state.refused.is_empty() {
            let target = self.dead_letter.as_ref().ok_or_else(|| {
                self.permanent(
                    "the checkpoint holds refused batches but the job declares no `dead_letter` table"
                        .to_string(),
                )
            })?;
            for refused in &state.refused {
                target
                    .write(refused)
                    .await
                    .map_err(|message| SinkError::Transient {
                        sink: self.name.clone(),
                        message,
                    })?;
            }
            self.refused
                .retain(|r| !state.refused.iter().any(|s| s.batch.id == r.batch.id));
        }
        self.committed_cuts = self.cuts;
        self.pump(false).await
    }

    fn permanent(&self, message: String) -> SinkError {
        SinkError::Permanent {
            sink: self.name.clone(),
            message,
        }
    }
}

/// `msg_` and 32 hex digits of SHA-256 over the job, the sink and the
/// positions of the batch's first and last rows.
fn batch_id(job: &str, sink: &str, rows: &[WebhookRow]) -> String {
    let first = rows.first().map(|r| r.position).unwrap_or_default();
    let last = rows.last().map(|r| r.position).unwrap_or_default();
    let mut hash = Sha256::new();
    for part in [job.as_bytes(), b"\0", sink.as_bytes(), b"\0"] {
        hash.update(part);
    }
    for n in [first.lsn, first.seq, last.lsn, last.seq] {
        hash.update(n.to_be_bytes());
    }
    let digest = hash.finalize();
    let mut id = String::with_capacity(36);
    id.push_str("msg_");
    for byte in &digest[..16] {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(positions: &[(u64, u64)]) -> Vec<WebhookRow> {
        positions
            .iter()
            .map(|&(lsn, seq)| WebhookRow {
                position: Position::new(lsn, seq),
                json: "{}".into(),
            })
            .collect()
    }

    #[test]
    fn batch_ids_depend_on_job_sink_and_bounds_only() {
        let a = batch_id("job", "hook", &rows(&[(10, 0), (10, 1), (12, 0)]));
        assert_eq!(
            a,
            batch_id("job", "hook", &rows(&[(10, 0), (11, 3), (12, 0)]))
        );
        assert_ne!(a, batch_id("job", "hook", &rows(&[(10, 0), (10, 1)])));
        assert_ne!(a, batch_id("job", "other", &rows(&[(10, 0), (12, 0)])));
        assert_ne!(a, batch_id("other", "hook", &rows(&[(10, 0), (12, 0)])));
        assert!(a.starts_with("msg_") && a.len() == 36);
    }
}

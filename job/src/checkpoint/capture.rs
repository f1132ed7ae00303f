//! The capture log: every change batch of an epoch, as one Arrow IPC stream
//! per table, written with the epoch's checkpoint.
//!
//! Compressing the capture cost the engine's loop about a tenth of its time
//! in the 1M-event drain, so it happens on a thread of its own: `append`
//! hands the batch over a bounded channel (a full channel makes the engine
//! wait, so memory stays bounded), and `finish` waits for the thread to
//! encode everything sent before it. An encoding error is reported by the
//! `finish` of its epoch.

use std::collections::BTreeMap;

use arrow::error::ArrowError;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{ipc_options, StateFile};

/// Batches waiting to be encoded at most (each is a change batch of the
/// source, up to 8,192 rows and a few MiB): what they hold stays in memory
/// until the thread has encoded them.
const PENDING: usize = 4;

/// Files of one epoch's capture: (file name, bytes).
type Files = Vec<(String, Bytes)>;

/// The encoded streams of one epoch: (table, bytes).
type Streams = Vec<(String, Bytes)>;

enum Work {
    Append(String, RecordBatch),
    Finish(oneshot::Sender<Result<Streams, ArrowError>>),
}

/// Appends batches of one epoch to an IPC stream per table, in memory.
#[derive(Default)]
pub struct CaptureLog {
    /// The encoding thread, started by the first append.
    encoder: Option<mpsc::Sender<Work>>,
    /// (table, rows) of each batch appended this epoch, in order.
    order: Vec<(String, u64)>,
    /// Rows appended this epoch, over every table.
    rows: u64,
}

impl CaptureLog {
    pub async fn append(&mut self, table: &str, batch: &RecordBatch) -> Result<(), ArrowError> {
        let sent = self
            .encoder()
            .send(Work::Append(table.to_string(), batch.clone()))
            .await;
        sent.map_err(|_| gone())?;
        self.order
            .push((table.to_string(), batch.num_rows() as u64));
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Rows appended since the last [`Self::finish`].
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Closes the epoch's capture: files to write, their references and the batch order.
    #[allow(clippy::type_complexity)]
    pub async fn finish(
        &mut self,
    ) -> Result<(Files, BTreeMap<String, StateFile>, Vec<(String, u64)>), ArrowError> {
        let (reply, files) = oneshot::channel();
        self.encoder()
            .send(Work::Finish(reply))
            .await
            .map_err(|_| gone())?;
        let streams = files.await.map_err(|_| gone())??;
        let order = std::mem::take(&mut self.order);
        self.rows = 0;
        let mut refs = BTreeMap::new();
        let mut files = Vec::with_capacity(streams.len());
        for (table, bytes) in streams {
            let rows = order.iter().filter(|(t, _)| *t == table).map(|(_, n)| n);
            let state = StateFile {
                file: file_name(&table),
                rows: rows.sum(),
                bytes: bytes.len() as u64,
            };
            files.push((state.file.clone(), bytes));
            refs.insert(table, state);
        }
        Ok((files, refs, order))
    }

    fn encoder(&mut self) -> &mpsc::Sender<Work> {
        self.encoder.get_or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(PENDING);
            std::thread::Builder::new()
                .name("capture".into())
                .spawn(move || encode(receiver))
                .expect("failed to start the capture thread");
            sender
        })
    }
}

fn file_name(table: &str) -> String {
    format!("capture-{table}.arrows")
}

fn gone() -> ArrowError {
    ArrowError::ExternalError("the capture thread stopped".into())
}

/// The capture thread: encodes what it is sent until the log is dropped.
fn encode(mut work: mpsc::Receiver<Work>) {
    let mut writers: BTreeMap<String, StreamWriter<Vec<u8>>> = BTreeMap::new();
    let mut failed: Option<ArrowError> = None;
    while let Some(item) = work.blocking_recv() {
        match item {
            Work::Append(_, _) if failed.is_some() => {}
            Work::Append(table, batch) => {
                if let Err(error) = write(&mut writers, &table, &batch) {
                    failed = Some(ArrowError::ExternalError(
                        format!("capture of `{table}`: {error}").into(),
                    ));
                }
            }
            Work::Finish(reply) => {
                let writers = std::mem::take(&mut writers);
                let files = match failed.take() {
                    Some(error) => Err(error),
                    None => close(writers),
                };
                let _ = reply.send(files);
            }
        }
    }
}

fn write(
    writers: &mut BTreeMap<String, StreamWriter<Vec<u8>>>,
    table: &str,
    batch: &RecordBatch,
) -> Result<(), ArrowError> {
    if !writers.contains_key(table) {
        let writer =
            StreamWriter::try_new_with_options(Vec::new(), &batch.schema(), ipc_options()?)?;
        writers.insert(table.to_string(), writer);
    }
    writers.get_mut(table).expect("inserted above").write(batch)
}

fn close(writers: BTreeMap<String, StreamWriter<Vec<u8>>>) -> Result<Streams, ArrowError> {
    writers
        .into_iter()
        .map(|(table, mut writer)| {
            writer.finish()?;
            Ok((table, Bytes::from(writer.into_inner()?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::decode_ipc;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[tokio::test]
    async fn capture_log_round_trips_batches_in_order() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch = |v: i64| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
        };
        let mut log = CaptureLog::default();
        log.append("a", &batch(1)).await.unwrap();
        log.append("b", &batch(2)).await.unwrap();
        log.append("a", &batch(3)).await.unwrap();
        let (files, refs, order) = log.finish().await.unwrap();
        assert_eq!(
            order,
            vec![("a".into(), 1), ("b".into(), 1), ("a".into(), 1)]
        );
        assert_eq!(refs["a"].rows, 2);
        let a = decode_ipc(
            files
                .into_iter()
                .find(|(n, _)| n == "capture-a.arrows")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(a, vec![batch(1), batch(3)]);
        // The next epoch starts empty.
        log.append("b", &batch(4)).await.unwrap();
        let (files, refs, order) = log.finish().await.unwrap();
        assert_eq!(order, vec![("b".into(), 1)]);
        assert_eq!(refs.len(), 1);
        assert_eq!(decode_ipc(files[0].1.clone()).unwrap(), vec![batch(4)]);
    }
}

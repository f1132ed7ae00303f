//! Consistent initial load of dimension tables.
//!
//! When a job's slot is created, Postgres exports a snapshot that sees
//! exactly the transactions committed before the slot's consistent point.
//! Reading a dimension table (such as `content`) inside that snapshot, then
//! streaming from the consistent point, gives every row exactly once: from
//! the snapshot if it committed before, from the stream if after.
//!
//! Rows are read with `COPY (SELECT ...) TO STDOUT` in text format and fed
//! through the same pgoutput decoder as streamed changes (each COPY row is
//! re-framed as a pgoutput insert), so snapshot and stream parse values
//! identically.

use arrow::record_batch::RecordBatch;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;

use super::pgoutput::{self, DecodeError, Message, Relation, RelationColumn, TableDecoder};
use super::replication::SourceError;
use super::setup::{cdc_options, PgTarget};
use super::{Position, RejectedChange};
use crate::change::Op;
use crate::sql::plan::SourceTable;

/// Reads `source`'s current rows inside `snapshot` (an exported snapshot name)
/// on the control connection. Rows get position (`lsn`, row number). A row
/// with a value the declared types cannot hold is returned apart, as a
/// [`RejectedChange`] (its time: when the snapshot was read), as the stream
/// does with such changes.
pub async fn load_table(
    target: &PgTarget,
    client: &tokio_postgres::Client,
    source: &SourceTable,
    snapshot: &str,
    lsn: u64,
) -> Result<(RecordBatch, Vec<RejectedChange>), SourceError> {
    let options = cdc_options(source).expect("dimension is a postgres-cdc table");
    let check = |message: String| SourceError::Check {
        target: target.to_string(),
        message,
    };
    let columns: Vec<String> = source
        .declared
        .fields()
        .iter()
        .map(|f| format!("\"{}\"", f.name().replace('"', "\"\"")))
        .collect();
    let copy = format!(
        "COPY (SELECT {} FROM \"{}\".\"{}\") TO STDOUT",
        columns.join(", "),
        options.schema.replace('"', "\"\""),
        options.table.replace('"', "\"\"")
    );
    begin_in_snapshot(client, snapshot, check).await?;

    let mut decoder = text_decoder(&source.def.name, &source.declared)?;

    let stream = client.copy_out(&copy).await.map_err(|e| {
        check(format!(
            "failed to read {}.{}: {e}",
            options.schema, options.table
        ))
    })?;
    futures::pin_mut!(stream);
    let mut line = Vec::new();
    let mut message = BytesMut::new();
    let mut row = 0u64;
    let mut rejected = Vec::new();
    let read_at = chrono::Utc::now().timestamp_micros();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            check(format!(
                "failed to read {}.{}: {e}",
                options.schema, options.table
            ))
        })?;
        for &byte in chunk.iter() {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            reframe_as_insert(&line, columns.len(), &mut message);
            let frozen: Bytes = message.split().freeze();
            let position = Position::new(lsn, row);
            match pgoutput::decode(&frozen) {
                Ok(Message::Insert { new, .. }) => {
                    if let Err(error) = decoder.append(Op::Insert, &new, None, position, 0) {
                        let rejection = decoder.reject(error, &new, position, read_at);
                        rejected.push(rejection.map_err(|e| SourceError::Decode {
                            table: source.def.name.clone(),
                            message: e.to_string(),
                        })?);
                    }
                }
                _ => {
                    return Err(SourceError::Decode {
                        table: source.def.name.clone(),
                        message: "a COPY row could not be framed as a tuple".into(),
                    })
                }
            }
            line.clear();
            row += 1;
        }
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| check(format!("failed to end the snapshot transaction: {e}")))?;
    tracing::info!(table = %source.def.name, rows = row, "dimension loaded from the slot's snapshot");
    Ok((decoder.finish(), rejected))
}

/// The snapshot a new slot exported, as `pg_current_snapshot()` text
/// (`xmin:xmax:xip,...`), and the server's time then (Unix µs): a row version
/// visible in it committed before the stream's first change, so the stream
/// never delivered it (what a backfill needs to know; see `backfill`).
pub async fn origin(
    target: &PgTarget,
    client: &tokio_postgres::Client,
    snapshot: &str,
) -> Result<crate::checkpoint::StreamOrigin, SourceError> {
    let check = |message: String| SourceError::Check {
        target: target.to_string(),
        message,
    };
    begin_in_snapshot(client, snapshot, check).await?;
    let row = client
        .query_one(
            "SELECT pg_current_snapshot()::text, \
                    (extract(epoch FROM now()) * 1000000)::bigint",
            &[],
        )
        .await
        .map_err(|e| check(format!("failed to read the slot's snapshot: {e}")))?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| check(format!("failed to end the snapshot transaction: {e}")))?;
    Ok(crate::checkpoint::StreamOrigin {
        snapshot: row.get(0),
        at_micros: row.get(1),
    })
}

/// Begins a read-only transaction in `snapshot` (a slot's exported one).
async fn begin_in_snapshot(
    client: &tokio_postgres::Client,
    snapshot: &str,
    check: impl Fn(String) -> SourceError,
) -> Result<(), SourceError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| check(format!("failed to begin the snapshot transaction: {e}")))?;
    client
        .batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .map_err(|e| check(format!("failed to use the slot's snapshot {snapshot}: {e}")))
}

/// A decoder for COPY text rows of a table with `declared` columns, each
/// re-framed as a pgoutput insert (see [`reframe_as_insert`]).
pub(crate) fn text_decoder(
    name: &str,
    declared: &arrow::datatypes::SchemaRef,
) -> Result<TableDecoder, SourceError> {
    let error = |e: DecodeError| SourceError::Decode {
        table: name.to_string(),
        message: e.to_string(),
    };
    let mut decoder = TableDecoder::new(name, declared.clone()).map_err(error)?;
    decoder
        .set_relation(&Relation {
            id: 0,
            namespace: String::new(),
            name: name.to_string(),
            replica_identity: b'f',
            columns: declared
                .fields()
                .iter()
                .map(|f| RelationColumn {
                    is_key: false,
                    name: f.name().clone(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
        .map_err(error)?;
    Ok(decoder)
}

/// Turns one COPY text line into a pgoutput Insert message (relation 0).
pub(crate) fn reframe_as_insert(line: &[u8], columns: usize, out: &mut BytesMut) {
    out.clear();
    out.put_u8(b'I');
    out.put_u32(0);
    out.put_u8(b'N');
    out.put_u16(columns as u16);
    let mut value = Vec::new();
    for field in line.split(|b| *b == b'\t') {
        if field == b"\\N" {
            out.put_u8(b'n');
            continue;
        }
        unescape_copy(field, &mut value);
        out.put_u8(b't');
        out.put_u32(value.len() as u32);
        out.put_slice(&value);
    }
}

/// Undoes COPY text-format escaping (`\\`, `\t`, `\n`, `\r`, octal, ...).
fn unescape_copy(field: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut bytes = field.iter().copied().peekable();
    while let Some(byte) = bytes.next() {
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        match bytes.next() {
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'v') => out.push(11),
            Some(d @ b'0'..=b'7') => {
                let mut code = (d - b'0') as u32;
                for _ in 0..2 {
                    match bytes.peek() {
                        Some(&n @ b'0'..=b'7') => {
                            code = code * 8 + (n - b'0') as u32;
                            bytes.next();
                        }
                        _ => break,
                    }
                }
                out.push(code as u8);
            }
            Some(other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_escapes_are_undone() {
        let mut out = Vec::new();
        unescape_copy(br"a\tb\\c\nd\101", &mut out);
        assert_eq!(out, b"a\tb\\c\ndA");
    }

    #[test]
    fn copy_lines_reframe_as_pgoutput_inserts() {
        let mut message = BytesMut::new();
        reframe_as_insert(b"1\t\\N\thello", 3, &mut message);
        let frozen = message.freeze();
        let Ok(Message::Insert { new, .. }) = pgoutput::decode(&frozen) else {
            panic!("not an insert")
        };
        let values: Vec<_> = new.values().map(|v| v.unwrap()).collect();
        assert!(matches!(values[0], pgoutput::Value::Text(b"1")));
        assert!(matches!(values[1], pgoutput::Value::Null));
        assert!(matches!(values[2], pgoutput::Value::Text(b"hello")));
    }
}

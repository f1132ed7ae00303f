//! Reading a backfill's rows from Postgres: the watermark messages, the
//! chunk `SELECT`s (as `COPY ... TO STDOUT`, decoded like the stream), the
//! estimate, and the checks made before anything runs.

use std::time::{Duration, Instant};

use arrow::array::{Array, BooleanArray, StringArray};
use arrow::record_batch::RecordBatch;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{Marker, Request, MARKER_PREFIX};
use crate::change::{Op, Position};
use crate::checkpoint::StreamOrigin;
use crate::source::pgoutput::{self, Message};
use crate::source::replication::SourceError;
use crate::source::setup::{cdc_options, quoted, PgTarget};
use crate::source::snapshot::{reframe_as_insert, text_decoder};
use crate::source::RejectedChange;
use crate::sql::plan::SourceTable;

/// The table a backfill reads, and how.
#[derive(Debug, Clone)]
pub struct Table {
    /// Index among the plan's sources.
    pub source: usize,
    /// Name in the job SQL.
    pub name: String,
    /// `"schema"."table"`.
    pub quoted: String,
    /// The single primary-key column.
    pub key: String,
    /// The watermark (event-time) column.
    pub time: String,
    pub declared: arrow::datatypes::SchemaRef,
    target: String,
}

/// Why a backfill cannot run: said before anything runs.
pub fn table_for(sources: &[SourceTable], name: Option<&str>) -> Result<Table, String> {
    let candidates: Vec<usize> = (0..sources.len())
        .filter(|&i| cdc_options(&sources[i]).is_some() && !sources[i].is_dimension)
        .collect();
    let source = match name {
        Some(name) => sources
            .iter()
            .position(|s| s.def.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                format!(
                    "table `{name}` is not a source of this job; its postgres-cdc tables: {}",
                    sources
                        .iter()
                        .map(|s| s.def.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
        None => match candidates.as_slice() {
            [one] => *one,
            [] => {
                return Err("this job reads no postgres-cdc table that drives its queries".into())
            }
            many => {
                return Err(format!(
                    "this job has several driving tables ({}): say which with --table",
                    many.iter()
                        .map(|&i| sources[i].def.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        },
    };
    let table = &sources[source];
    let Some(options) = cdc_options(table) else {
        return Err(format!(
            "table `{}` is not a postgres-cdc source",
            table.def.name
        ));
    };
    if table.is_dimension {
        return Err(format!(
            "table `{}` is read as a dimension (kept whole in memory, loaded at start): only a table that \
             drives the job's queries can be backfilled",
            table.def.name
        ));
    }
    let time = table.def.watermark.as_ref().ok_or_else(|| {
        format!(
            "table `{}` declares no WATERMARK: a backfill selects rows by event time, so the table needs one \
             (WATERMARK FOR <column> AS ...)",
            table.def.name
        )
    })?;
    let key = match table.primary_key.as_slice() {
        [k] => table.declared.field(*k).name().clone(),
        [] => {
            return Err(format!(
                "table `{}` declares no PRIMARY KEY: a backfill reads in key order, so it needs one",
                table.def.name
            ))
        }
        _ => {
            return Err(format!(
                "table `{}` has a composite primary key; backfills read tables with a single-column key",
                table.def.name
            ))
        }
    };
    Ok(Table {
        source,
        name: table.def.name.clone(),
        quoted: quoted(&options.schema, &options.table),
        key,
        time: time.column.clone(),
        declared: table.declared.clone(),
        target: options.connection.expose().to_string(),
    })
}

impl Table {
    /// Connects to the table's database.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, SourceError> {
        PgTarget::parse(&self.target)?.connect().await
    }

    fn column(name: &str) -> String {
        format!("\"{}\"", name.replace('"', "\"\""))
    }

    /// The request's rows: `WHERE` range, filter and cursor.
    fn condition(&self, request: &Request, cursor: Option<&str>) -> String {
        let time = Self::column(&self.time);
        let mut parts = vec![format!("{time} >= '{}'", super::rfc3339(request.since))];
        if let Some(until) = request.until {
            parts.push(format!("{time} < '{}'", super::rfc3339(until)));
        }
        if let Some(filter) = &request.filter {
            parts.push(format!("({filter})"));
        }
        if let Some(cursor) = cursor {
            parts.push(format!(
                "{} > '{}'",
                Self::column(&self.key),
                cursor.replace('\'', "''")
            ));
        }
        parts.join(" AND ")
    }
}

/// Checks `request` against the database: the filter parses and names real
/// columns, the table is readable. A clear error before anything runs.
pub async fn check(
    client: &tokio_postgres::Client,
    table: &Table,
    request: &Request,
) -> Result<(), String> {
    let sql = format!(
        "EXPLAIN SELECT 1 FROM {} WHERE {}",
        table.quoted,
        table.condition(request, None)
    );
    client.batch_execute(&sql).await.map_err(|e| {
        let detail = detail(&e);
        match &request.filter {
            Some(filter) => format!(
                "--where \"{filter}\" does not work on {}: {detail}",
                table.quoted
            ),
            None => format!("cannot read {}: {detail}", table.quoted),
        }
    })
}

/// Rows of the range now (`count(*)`), for progress.
pub async fn estimate(
    client: &tokio_postgres::Client,
    table: &Table,
    request: &Request,
) -> Result<u64, SourceError> {
    let sql = format!(
        "SELECT count(*) FROM {} WHERE {}",
        table.quoted,
        table.condition(request, None)
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| read_error(table, e))?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

/// Writes a watermark to the WAL, in a transaction of its own.
pub async fn emit_marker(
    client: &tokio_postgres::Client,
    table: &Table,
    marker: &Marker,
) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&MARKER_PREFIX, &marker.encode()],
        )
        .await
        .map_err(|e| {
            let message = format!(
                "failed to write a backfill watermark (pg_logical_emit_message; the job's role needs \
                 EXECUTE on it, which PUBLIC has by default): {}",
                detail(&e)
            );
            failure(table, message, &e)
        })?;
    Ok(())
}

impl Table {
    fn target_display(&self) -> String {
        PgTarget::parse(&self.target)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| self.quoted.clone())
    }
}

fn read_error(table: &Table, e: tokio_postgres::Error) -> SourceError {
    failure(
        table,
        format!("backfill read of {} failed: {}", table.quoted, detail(&e)),
        &e,
    )
}

/// A lost connection or a server shutting down (SQLSTATE classes 08 and
/// 57) is a stream failure, which a restart cures: the job restarts and
/// the backfill goes on from its checkpoint. Anything else (a permission,
/// a filter that no longer works) is reported as it is.
fn failure(table: &Table, message: String, e: &tokio_postgres::Error) -> SourceError {
    let transient = match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57")
        }
    };
    match transient {
        true => SourceError::Stream {
            target: table.target_display(),
            message,
        },
        false => SourceError::Check {
            target: table.target_display(),
            message,
        },
    }
}

/// The server's message of a database error (its `Display` says only "db error").
fn detail(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// One chunk, as read.
pub struct Chunk {
    /// The rows, `_op = 'r'`; positions are set when they are emitted.
    pub rows: RecordBatch,
    /// Per row: the stream never delivered this version of it.
    pub unstreamed: BooleanArray,
    /// Never-streamed rows with values the declared types cannot hold
    /// (their positions are set when the chunk is emitted).
    pub rejected: Vec<RejectedChange>,
    /// The last key read (Postgres text), where the next chunk starts.
    pub last_key: Option<String>,
    /// How long the `SELECT` took.
    pub elapsed: Duration,
    /// The chunk asked for `limit` rows and got fewer: the range is done.
    pub last: bool,
}

/// Reads up to `limit` rows of the range after `cursor`, in key order.
/// `origin` is the snapshot the job's stream began at: a row version visible
/// in it was never streamed (without one, every row counts as unstreamed).
pub async fn read(
    client: &tokio_postgres::Client,
    table: &Table,
    request: &Request,
    origin: Option<&StreamOrigin>,
    cursor: Option<&str>,
    limit: usize,
) -> Result<Chunk, SourceError> {
    let started = Instant::now();
    let columns: Vec<String> = table
        .declared
        .fields()
        .iter()
        .map(|f| Table::column(f.name()))
        .collect();
    let unstreamed = match origin.and_then(origin_xmin) {
        // The row version's xmin as a 64-bit id: the origin's xmin, moved by
        // the difference of their ages (both taken against the same next xid
        // of this statement, so wraparound of 32-bit ids cancels out).
        Some((xmin64, xmin32)) => format!(
            "pg_visible_in_snapshot(({xmin64} + age('{xmin32}'::xid) - age(xmin))::text::xid8, '{}'::pg_snapshot)",
            origin.map(|o| o.snapshot.replace('\'', "''")).unwrap_or_default()
        ),
        None => "true".to_string(),
    };
    let key = Table::column(&table.key);
    let copy = format!(
        "COPY (SELECT {}, {key}::text AS engage_key, {unstreamed} AS engage_unstreamed FROM {} WHERE {} \
         ORDER BY {}.{key} LIMIT {limit}) TO STDOUT",
        columns.join(", "),
        table.quoted,
        table.condition(request, cursor),
        table.quoted
    );
    let mut decoder = text_decoder(&table.name, &table.declared)?;
    let stream = client
        .copy_out(&copy)
        .await
        .map_err(|e| read_error(table, e))?;
    futures::pin_mut!(stream);
    let mut line = Vec::new();
    let mut message = BytesMut::new();
    let mut flags = Vec::new();
    let mut last_key = None;
    let mut row = 0u64;
    let mut rejected = Vec::new();
    while let Some(data) = stream.next().await {
        let data = data.map_err(|e| read_error(table, e))?;
        for &byte in data.iter() {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            // The two extra fields: the key as text, the unstreamed flag.
            let mut fields = line.rsplitn(3, |b| *b == b'\t');
            let flag = fields.next().unwrap_or_default() == b"t";
            let key = fields
                .next()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            let values = fields.next().unwrap_or_default();
            reframe_as_insert(values, columns.len(), &mut message);
            let frozen: Bytes = message.split().freeze();
            let Ok(Message::Insert { new, .. }) = pgoutput::decode(&frozen) else {
                return Err(SourceError::Decode {
                    table: table.name.clone(),
                    message: "a COPY row could not be framed as a tuple".into(),
                });
            };
            match decoder.append(Op::Read, &new, None, Position::new(0, row), 0) {
                Ok(()) => flags.push(Some(flag)),
                // A value the declared type cannot hold goes to dead_letter,
                // as the stream does with such a change; once: only if the
                // stream never delivered this version.
                Err(error) if flag => {
                    let read_at = chrono::Utc::now().timestamp_micros();
                    rejected.push(
                        decoder
                            .reject(error, &new, Position::new(0, row), read_at)
                            .map_err(|e| SourceError::Decode {
                                table: table.name.clone(),
                                message: e.to_string(),
                            })?,
                    );
                }
                Err(_) => {}
            }
            last_key = key.or(last_key);
            line.clear();
            row += 1;
        }
    }
    Ok(Chunk {
        rows: decoder.finish(),
        rejected,
        unstreamed: BooleanArray::from(flags),
        last_key,
        elapsed: started.elapsed(),
        last: (row as usize) < limit,
    })
}

/// The origin snapshot's xmin, 64-bit and as a 32-bit xid.
fn origin_xmin(origin: &StreamOrigin) -> Option<(u64, u64)> {
    let xmin: u64 = origin.snapshot.split(':').next()?.parse().ok()?;
    Some((xmin, xmin & 0xFFFF_FFFF))
}

/// The primary keys of `batch` as text (Arrow's cast), to compare the keys
/// of streamed changes with those of a chunk.
pub fn key_texts(batch: &RecordBatch, key: &str) -> Result<StringArray, arrow::error::ArrowError> {
    let column = batch.column_by_name(key).ok_or_else(|| {
        arrow::error::ArrowError::SchemaError(format!("change batch without key column `{key}`"))
    })?;
    let text = arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8)?;
    Ok(text
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8")
        .clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_origin_xmin_is_read_from_the_snapshot_text() {
        let origin = StreamOrigin {
            snapshot: "4294967301:4294967305:4294967302".into(),
            at_micros: 0,
        };
        assert_eq!(origin_xmin(&origin), Some((4_294_967_301, 5)));
        let bad = StreamOrigin {
            snapshot: "x".into(),
            at_micros: 0,
        };
        assert_eq!(origin_xmin(&bad), None);
    }

    #[test]
    fn keys_compare_as_arrow_text() {
        let batch = RecordBatch::try_from_iter([(
            "id",
            std::sync::Arc::new(arrow::array::Int64Array::from(vec![1, 20]))
                as arrow::array::ArrayRef,
        )])
        .unwrap();
        let keys = key_texts(&batch, "id").unwrap();
        assert_eq!(keys.value(1), "20");
        assert!(key_texts(&batch, "missing").is_err());
    }
}

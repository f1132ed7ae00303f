//! Decodes pgoutput (protocol version 1, text values) and appends the changed
//! rows straight into Arrow builders.
//!
//! This is the hot path of the `postgres-cdc` source, so it is split in two
//! layers that never allocate per row:
//!
//! - [`decode`] reads one message as it came off the wire. It checks the whole
//!   framing up front (tags, lengths, tuple value kinds, trailing bytes) and
//!   returns a [`Message`] that borrows the bytes: a [`Tuple`] stays in wire form
//!   and its [`Value`]s are read lazily as slices. Only `Relation` (rare) owns
//!   strings. Begin and Commit are parsed by the transport (`pgwire-replication`).
//! - [`TableDecoder`] maps a relation's columns to the job's declared columns
//!   by name, parses each text value into its declared Arrow type with small
//!   hand parsers, and appends the row plus the change metadata columns
//!   (`_op`, `_lsn`, `_seq`, `_commit_ts`). A row is appended whole or not at
//!   all: values are parsed into a reused scratch row first, so a bad value
//!   never leaves the builders with uneven lengths.
//!
//! # Old tuples and unchanged TOAST
//!
//! Postgres does not resend a large (TOASTed) value that an `UPDATE` did not
//! touch: the new tuple carries the marker `u` instead. The old tuple is sent
//! only when the replica identity says so: `K` (key columns only, others `n`)
//! for a changed key, `O` (every column) with `REPLICA IDENTITY FULL`. An
//! unchanged value is taken from the old tuple when it carries it; otherwise it
//! is appended as NULL and counted in [`TableDecoder::unresolved_toast`], so the
//! caller can warn that a table needs `REPLICA IDENTITY FULL`. The marker itself
//! never reaches a batch. Deletes carry only the old tuple, so with the default
//! identity their non-key columns are NULL: every declared column is therefore
//! nullable in the output schema, whatever the declaration says.
//!
//! # Text formats
//!
//! The replication session pins the settings in [`text::SESSION_SETTINGS`],
//! so values arrive as `2026-11-21 13:10:00.5+00`, `1.5e-05`, `t`, `12.50`,
//! `P1DT-2H`, `\x00ff`, `{a,NULL,"b c"}`. Timestamps without an offset are read
//! as UTC. Infinite and BC dates have no Arrow value and are rejected as
//! [`DecodeError::BadValue`], as are numbers out of the declared range or
//! scale, `NaN` decimals, and text that is not UTF-8; the
//! reader turns such a change into a dead letter
//! ([`RejectedChange`](crate::source::RejectedChange)) and goes on.
//! Errors name the table, column, type and position, never the value itself.
//!
//! Files: this one holds the wire layer, `table` the [`TableDecoder`] and
//! `text` the value parsers.

mod table;
#[cfg(test)]
mod tests;
mod text;

use std::fmt;

use arrow::datatypes::DataType;

use crate::change::Position;

pub use table::{TableDecoder, PG_EPOCH_OFFSET_MICROS};
pub use text::SESSION_SETTINGS;

/// Declared Arrow types the decoder can fill, for error messages.
const SUPPORTED_TYPES: &str =
    "Int16, Int32, Int64, Float32, Float64, Boolean, Utf8, Date32, Timestamp (any unit and zone), \
     Decimal128, Time64(µs), Interval(MonthDayNano), Binary, and lists of these";

/// Why a pgoutput message or value could not be decoded. Every variant is
/// permanent: retrying the same WAL yields the same bytes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {tag:#04x}")]
    UnknownTag { tag: u8 },
    #[error("truncated pgoutput message {tag:?}")]
    Truncated { tag: char },
    #[error("malformed pgoutput message {tag:?}: {reason}")]
    Malformed { tag: char, reason: &'static str },
    /// For callers routing changes by relation id.
    #[error("change for unknown relation id {0}: no relation message was received for it")]
    UnknownRelation(u32),
    #[error("change for table {table} arrived before any relation message for it")]
    NoRelation { table: String },
    #[error("column {column} of table {table} is missing from relation {relation}")]
    MissingColumn {
        table: String,
        relation: String,
        column: String,
    },
    #[error("column {column} of table {table} has unsupported type {data_type}; supported types: {supported}", supported = SUPPORTED_TYPES)]
    UnsupportedType {
        table: String,
        column: String,
        data_type: DataType,
    },
    #[error("column {column} of table {table} uses a name reserved for change metadata")]
    ReservedColumn { table: String, column: String },
    #[error(
        "change for table {table} has {actual} columns but relation {relation} has {expected}"
    )]
    WrongColumnCount {
        table: String,
        relation: String,
        expected: usize,
        actual: usize,
    },
    #[error("bad value in column {column} ({data_type}) of table {table} at {position}: {reason}")]
    BadValue {
        table: String,
        column: String,
        data_type: DataType,
        position: Position,
        reason: &'static str,
    },
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (flag bit 1).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A table's shape as pgoutput announces it: at stream start and after every
/// schema change, always before the first change that uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

/// The old row of an update or delete: key columns only, or every column.
#[derive(Clone, Copy, Debug)]
pub enum OldTuple<'a> {
    Key(Tuple<'a>),
    Full(Tuple<'a>),
}

impl<'a> OldTuple<'a> {
    pub fn tuple(&self) -> &Tuple<'a> {
        match self {
            OldTuple::Key(tuple) | OldTuple::Full(tuple) => tuple,
        }
    }
}

/// One decoded pgoutput message, borrowing the message bytes.
#[derive(Clone, Debug)]
pub enum Message<'a> {
    Relation(Relation),
    Insert {
        relation_id: u32,
        new: Tuple<'a>,
    },
    Update {
        relation_id: u32,
        old: Option<OldTuple<'a>>,
        new: Tuple<'a>,
    },
    Delete {
        relation_id: u32,
        old: OldTuple<'a>,
    },
    Truncate {
        relation_ids: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// Begin, Commit, Type, Origin, logical Message, anything else we do not act on: its tag byte.
    Other(u8),
}

/// A tuple still in wire form; values are read lazily without allocating.
/// Its framing was checked by [`decode`]. `Debug` shows sizes only, never values.
#[derive(Clone, Copy)]
pub struct Tuple<'a> {
    tag: u8,
    columns: u16,
    data: &'a [u8],
}

impl<'a> Tuple<'a> {
    /// Number of columns.
    pub fn len(&self) -> usize {
        usize::from(self.columns)
    }

    pub fn is_empty(&self) -> bool {
        self.columns == 0
    }

    pub fn values(&self) -> TupleValues<'a> {
        TupleValues {
            reader: Reader::new(self.tag, self.data),
            remaining: self.columns,
        }
    }
}

impl fmt::Debug for Tuple<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tuple({} columns, {} bytes)",
            self.columns,
            self.data.len()
        )
    }
}

/// Iterator over a [`Tuple`]'s values.
pub struct TupleValues<'a> {
    reader: Reader<'a>,
    remaining: u16,
}

impl<'a> Iterator for TupleValues<'a> {
    type Item = Result<Value<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let value = self.reader.value();
        if value.is_err() {
            self.remaining = 0;
        }
        Some(value)
    }
}

/// One column value of a tuple. `Debug` shows the kind and size, never the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// A TOASTed value the change did not touch; Postgres did not resend it.
    UnchangedToast,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("Null"),
            Value::UnchangedToast => f.write_str("UnchangedToast"),
            Value::Text(bytes) => write!(f, "Text({} bytes)", bytes.len()),
            Value::Binary(bytes) => write!(f, "Binary({} bytes)", bytes.len()),
        }
    }
}

/// Decodes one pgoutput message (the payload of an XLogData frame).
pub fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (&tag, body) = data.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader::new(tag, body);
    let message = match tag {
        b'R' => Message::Relation(r.relation()?),
        b'I' => {
            let relation_id = r.u32()?;
            r.expect(b'N', "expected 'N' before the new tuple")?;
            Message::Insert {
                relation_id,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation_id = r.u32()?;
            let old = match r.u8()? {
                b'N' => None,
                kind @ (b'K' | b'O') => {
                    let old = r.tuple()?;
                    r.expect(b'N', "expected 'N' after the old tuple")?;
                    Some(if kind == b'K' {
                        OldTuple::Key(old)
                    } else {
                        OldTuple::Full(old)
                    })
                }
                _ => return Err(r.malformed("expected 'K', 'O' or 'N' after the relation id")),
            };
            Message::Update {
                relation_id,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation_id = r.u32()?;
            let old = match r.u8()? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                _ => return Err(r.malformed("expected 'K' or 'O' after the relation id")),
            };
            Message::Delete { relation_id, old }
        }
        b'T' => {
            let count = r.u32()? as usize;
            let options = r.u8()?;
            if count.saturating_mul(4) > r.remaining() {
                return Err(r.truncated());
            }
            let relation_ids = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate {
                relation_ids,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'B' | b'C' | b'Y' | b'O' | b'M' => return Ok(Message::Other(tag)),
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    if r.remaining() != 0 {
        return Err(r.malformed("unexpected bytes after the message"));
    }
    Ok(message)
}

/// A bounds-checked cursor over one message's bytes.
struct Reader<'a> {
    tag: u8,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(tag: u8, buf: &'a [u8]) -> Self {
        Reader { tag, buf, pos: 0 }
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated {
            tag: char::from(self.tag),
        }
    }

    fn malformed(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed {
            tag: char::from(self.tag),
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.truncated());
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| self.truncated())
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn expect(&mut self, byte: u8, reason: &'static str) -> Result<(), DecodeError> {
        if self.u8()? == byte {
            Ok(())
        } else {
            Err(self.malformed(reason))
        }
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated())?;
        let text = std::str::from_utf8(&rest[..len])
            .map_err(|_| self.malformed("a name is not valid utf-8"))?;
        self.pos += len + 1;
        Ok(text.to_owned())
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32()?;
        let namespace = self.string()?;
        let name = self.string()?;
        let replica_identity = self.u8()?;
        let count =
            usize::try_from(self.i16()?).map_err(|_| self.malformed("negative column count"))?;
        // Each column takes at least 10 bytes: do not trust the count for capacity.
        let mut columns = Vec::with_capacity(count.min(self.remaining() / 10));
        for _ in 0..count {
            let flags = self.u8()?;
            columns.push(RelationColumn {
                is_key: flags & 1 != 0,
                name: self.string()?,
                type_oid: self.u32()?,
                type_modifier: self.i32()?,
            });
        }
        Ok(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    /// Checks a TupleData's framing and returns it in wire form.
    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let columns =
            u16::try_from(self.i16()?).map_err(|_| self.malformed("negative column count"))?;
        let start = self.pos;
        for _ in 0..columns {
            self.value()?;
        }
        Ok(Tuple {
            tag: self.tag,
            columns,
            data: &self.buf[start..self.pos],
        })
    }

    fn value(&mut self) -> Result<Value<'a>, DecodeError> {
        let kind = self.u8()?;
        if kind == b'n' || kind == b'u' {
            return Ok(if kind == b'n' {
                Value::Null
            } else {
                Value::UnchangedToast
            });
        }
        if kind != b't' && kind != b'b' {
            return Err(self.malformed("unknown tuple value kind"));
        }
        let len =
            usize::try_from(self.i32()?).map_err(|_| self.malformed("negative value length"))?;
        let bytes = self.take(len)?;
        Ok(if kind == b't' {
            Value::Text(bytes)
        } else {
            Value::Binary(bytes)
        })
    }
}

//! Connector options of `CREATE TABLE ... WITH (...)`, validated into typed configs.
//!
//! Option names follow Arroyo's where Arroyo has the connector (`filesystem`,
//! `redis`); `postgres-cdc` is ours, named in the same style. An unknown
//! connector or option is an error that lists the valid ones. Values holding
//! credentials (`connection`, `address`) are kept in [`Redacted`] so they never
//! reach logs or `Debug` output.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use arrow::datatypes::{Field, Schema};

use crate::change::OP_COLUMN;
use crate::values;

mod bigquery;
mod kafka;
mod webhook;

pub use bigquery::BigQueryOptions;
pub use kafka::{ClientSettings, CommitMode, KafkaFormat, KafkaOptions};
pub use webhook::{Header, SigningKey, WebhookOptions};

/// A string that may hold credentials: `Debug`/`Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(String);

impl Redacted {
    pub fn new(value: impl Into<String>) -> Self {
        Redacted(value.into())
    }

    /// The real value, for connecting. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self)
    }
}

impl fmt::Display for Redacted {
    /// `scheme://user:***@host:port/db`: everything but the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut parsed) => {
                if parsed.password().is_some() {
                    let _ = parsed.set_password(Some("***"));
                }
                write!(f, "{parsed}")
            }
            Err(_) => write!(f, "<unparseable connection string>"),
        }
    }
}

/// Takes the query parameters named `keys` out of a connection URL (engage's
/// own settings, such as `sslrootcert`, which the client library behind it
/// does not know); returns them in the order they came.
pub fn take_query_params(url: &mut url::Url, keys: &[&str]) -> Vec<(String, String)> {
    let (taken, kept): (Vec<_>, Vec<_>) = url
        .query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .partition(|(key, _)| keys.contains(&key.as_str()));
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    taken
}

/// The connector of a table, with its validated options: a source the job
/// reads changes from, or a sink an `INSERT` writes to.
#[derive(Debug, Clone)]
pub enum Connector {
    Source(SourceConnector),
    Sink(SinkConnector),
}

/// Where changes come from.
#[derive(Debug, Clone)]
pub enum SourceConnector {
    PostgresCdc(PostgresCdcOptions),
}

/// Where a query's rows go.
#[derive(Debug, Clone)]
pub enum SinkConnector {
    Filesystem(FilesystemOptions),
    Redis(RedisOptions),
    /// A Kafka topic, one message per change.
    Kafka(KafkaOptions),
    /// An HTTP endpoint, one POST per batch of rows (Standard Webhooks).
    Webhook(WebhookOptions),
    /// Discards its rows (as Flink's and Arroyo's `blackhole`): the cost of
    /// a pipeline without the cost of its outputs.
    Blackhole,
}

impl Connector {
    pub fn as_source(&self) -> Option<&SourceConnector> {
        match self {
            Connector::Source(source) => Some(source),
            Connector::Sink(_) => None,
        }
    }

    pub fn as_sink(&self) -> Option<&SinkConnector> {
        match self {
            Connector::Sink(sink) => Some(sink),
            Connector::Source(_) => None,
        }
    }

    /// The filesystem sink's options, if the table is one.
    pub fn filesystem(&self) -> Option<&FilesystemOptions> {
        match self {
            Connector::Sink(SinkConnector::Filesystem(options)) => Some(options),
            _ => None,
        }
    }

    /// The Redis sink's options, if the table is one.
    pub fn redis(&self) -> Option<&RedisOptions> {
        match self {
            Connector::Sink(SinkConnector::Redis(options)) => Some(options),
            _ => None,
        }
    }

    /// The Kafka sink's options, if the table is one.
    pub fn kafka(&self) -> Option<&KafkaOptions> {
        match self {
            Connector::Sink(SinkConnector::Kafka(options)) => Some(options),
            _ => None,
        }
    }

    /// The postgres-cdc source's options, if the table is one.
    pub fn postgres_cdc(&self) -> Option<&PostgresCdcOptions> {
        match self {
            Connector::Source(SourceConnector::PostgresCdc(options)) => Some(options),
            _ => None,
        }
    }
}

pub const CONNECTORS: &[&str] = &[
    "postgres-cdc",
    "filesystem",
    "redis",
    "kafka",
    "webhook",
    "blackhole",
];

#[derive(Debug, Clone)]
pub struct PostgresCdcOptions {
    /// `postgres://user:password@host:port/database`.
    pub connection: Redacted,
    pub schema: String,
    pub table: String,
    /// Replication slot; defaults to `engage_<job>`.
    pub slot: Option<String>,
    /// Publication; defaults to `engage_<job>`.
    pub publication: Option<String>,
    /// `'replica_identity.autoset' = 'full'`: engage may run `ALTER TABLE ...
    /// REPLICA IDENTITY FULL` itself when its windowed queries need old rows
    /// (as Debezium's `replica.identity.autoset.values`).
    pub autoset_full_identity: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParquetCompression {
    Zstd,
    Snappy,
    Uncompressed,
}

#[derive(Debug, Clone)]
pub struct FilesystemOptions {
    /// A local directory or an object store URL (`s3://`, `gs://`, `file://`).
    pub path: String,
    pub compression: ParquetCompression,
    /// strftime pattern of the partition directory, e.g. `event_date=%Y-%m-%d`.
    pub time_pattern: Option<String>,
    /// The output column whose time names the partition; defaults to the
    /// driving table's watermark column.
    pub time_column: Option<String>,
    /// `bigquery.*`: load the committed files into a BigQuery table.
    pub bigquery: Option<BigQueryOptions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTarget {
    String,
    List,
    Hash,
    /// A ranking: one member per row, scored by a numeric column.
    SortedSet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOperation {
    Append,
    Prepend,
}

#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port[/db]`, or `rediss://` for TLS (`?sslrootcert=` names a CA file).
    pub address: Redacted,
    pub target: RedisTarget,
    pub key_prefix: String,
    pub key_column: Option<String>,
    /// Hash target: the column whose value is the hash field. Without it,
    /// every column of the row is a field (column name -> value as text).
    pub field_column: Option<String>,
    /// Hash target with a field column: the column whose text is the field's
    /// value (default: the row as JSON).
    pub value_column: Option<String>,
    /// Sorted set target: the column whose text is the member.
    pub member_column: Option<String>,
    /// Sorted set target: the numeric column that scores the member.
    pub score_column: Option<String>,
    pub ttl_secs: Option<u64>,
    /// List target: keep at most this many entries; sorted set target: keep
    /// only this many members, those with the highest scores.
    pub max_length: Option<u64>,
    pub operation: ListOperation,
    /// List target: the JSON field that identifies an entry. With it, the
    /// query's `_op` column says what a row does: `c`/`u` push it, `d`
    /// removes the entries whose field equals the row's (`_op` itself is not
    /// written).
    pub id_column: Option<String>,
}

impl RedisOptions {
    /// Checks the sink's column options against the query's output: every named
    /// column must be an output column that can be written as text, and the score
    /// column must be numeric.
    pub fn check_columns(&self, schema: &Schema) -> Result<(), String> {
        for (option, column) in [
            ("target.key_column", &self.key_column),
            ("target.field_column", &self.field_column),
            ("target.value_column", &self.value_column),
            ("target.member_column", &self.member_column),
            ("target.score_column", &self.score_column),
            ("target.id_column", &self.id_column),
        ] {
            let Some(column) = column else { continue };
            let Ok(index) = schema.index_of(column) else {
                let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(format!(
                    "`{option}` names `{column}`, which is not an output column; output columns: {}",
                    names.join(", ")
                ));
            };
            let data_type = schema.field(index).data_type();
            if option == "target.score_column" {
                if !data_type.is_numeric() {
                    return Err(format!(
                        "`target.score_column` names `{column}`, of type {data_type}; a score must be \
                         numeric (an integer, float or decimal column)"
                    ));
                }
            } else if !values::has_text(data_type) {
                return Err(format!(
                    "`{option}` names `{column}`, of type {data_type}, which cannot be written as text"
                ));
            }
        }
        if let Some(id) = &self.id_column {
            if schema.index_of(OP_COLUMN).is_err() {
                return Err(format!(
                    "`target.id_column` makes a list follow changes, so the query must select `{OP_COLUMN}` \
                     (rows with `d` remove the entries whose `{id}` equals theirs)"
                ));
            }
        }
        if self.target == RedisTarget::Hash && self.field_column.is_none() {
            if let Some(field) = schema
                .fields()
                .iter()
                .find(|f| !values::has_text(f.data_type()))
            {
                return Err(format!(
                    "a redis `hash` without `target.field_column` writes every column as a field, \
                     but `{}` (of type {}) cannot be written as text",
                    field.name(),
                    field.data_type()
                ));
            }
        }
        Ok(())
    }
}

const POSTGRES_OPTIONS: &[&str] = &[
    "connector",
    "connection",
    "table",
    "slot",
    "publication",
    "replica_identity.autoset",
    "type",
];
const FILESYSTEM_OPTIONS: &[&str] = &[
    "connector",
    "path",
    "format",
    "parquet_compression",
    "partitioning.time_pattern",
    "partitioning.time_column",
    "type",
    "bigquery.table",
    "bigquery.location",
    "bigquery.credentials",
    "bigquery.endpoint",
    "bigquery.source_uri_prefix",
];
const REDIS_OPTIONS: &[&str] = &[
    "connector",
    "address",
    "format",
    "type",
    "target",
    "target.key_prefix",
    "target.key_column",
    "target.field_column",
    "target.value_column",
    "target.member_column",
    "target.score_column",
    "target.ttl_secs",
    "target.max_length",
    "target.operation",
    "target.id_column",
];

/// Options still to be consumed; whatever is left at the end is unknown.
struct Options {
    values: BTreeMap<String, String>,
}

impl Options {
    fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    fn require(&mut self, key: &str, connector: &str) -> Result<String, String> {
        self.take(key)
            .ok_or_else(|| format!("connector `{connector}` needs option `{key}`"))
    }

    fn number(&mut self, key: &str) -> Result<Option<u64>, String> {
        self.take(key)
            .map(|text| {
                text.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    format!("option `{key}` must be a positive whole number, got `{text}`")
                })
            })
            .transpose()
    }

    fn finish(self, connector: &str, valid: &[&str]) -> Result<(), String> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(unknown) => Err(format!(
                "unknown option `{unknown}` for connector `{connector}`; valid options: {}",
                valid.join(", ")
            )),
        }
    }
}

fn one_of(
    key: &str,
    value: Option<String>,
    valid: &[&str],
    default: &str,
) -> Result<String, String> {
    let value = value.unwrap_or_else(|| default.to_string());
    if valid.contains(&value.as_str()) {
        Ok(value)
    } else {
        Err(format!(
            "option `{key}` must be one of {}, got `{value}`",
            valid.join(", ")
        ))
    }
}

impl Connector {
    /// Validates a table's options. `columns` are its declared columns.
    pub fn from_options(
        table: &str,
        columns: &[Field],
        options: HashMap<String, String>,
    ) -> Result<Connector, String> {
        let mut options = Options {
            values: options.into_iter().collect(),
        };
        let Some(connector) = options.take("connector") else {
            return Err(format!(
                "table `{table}` needs a `connector` option; valid connectors: {}",
                CONNECTORS.join(", ")
            ));
        };
        match connector.as_str() {
            "postgres-cdc" => {
                one_of("type", options.take("type"), &["source"], "source")?;
                let connection = Redacted::new(options.require("connection", &connector)?);
                if url::Url::parse(connection.expose()).map(|u| u.scheme().starts_with("postgres"))
                    != Ok(true)
                {
                    return Err(format!(
                        "option `connection` must be a postgres:// URL, got `{connection}`"
                    ));
                }
                let full = options.require("table", &connector)?;
                let (schema, name) = match full.split_once('.') {
                    Some((schema, name)) => (schema.to_string(), name.to_string()),
                    None => ("public".to_string(), full.clone()),
                };
                let slot = options.take("slot");
                let publication = options.take("publication");
                for (key, value) in [("slot", &slot), ("publication", &publication)] {
                    if let Some(value) = value {
                        if !is_simple_identifier(value) {
                            return Err(format!(
                                "option `{key}` must be lower-case letters, digits and `_`, got `{value}`"
                            ));
                        }
                    }
                }
                let autoset = options.take("replica_identity.autoset");
                if autoset
                    .as_deref()
                    .is_some_and(|v| !v.eq_ignore_ascii_case("full"))
                {
                    return Err(format!(
                        "option `replica_identity.autoset` must be `full`, got `{}`",
                        autoset.unwrap_or_default()
                    ));
                }
                options.finish(&connector, POSTGRES_OPTIONS)?;
                Ok(Connector::Source(SourceConnector::PostgresCdc(
                    PostgresCdcOptions {
                        connection,
                        schema,
                        table: name,
                        slot,
                        publication,
                        autoset_full_identity: autoset.is_some(),
                    },
                )))
            }
            "filesystem" => {
                one_of("type", options.take("type"), &["sink"], "sink")?;
                one_of("format", options.take("format"), &["parquet"], "parquet")?;
                let path = options.require("path", &connector)?;
                let compression = match one_of(
                    "parquet_compression",
                    options.take("parquet_compression"),
                    &["zstd", "snappy", "uncompressed"],
                    "zstd",
                )?
                .as_str()
                {
                    "snappy" => ParquetCompression::Snappy,
                    "uncompressed" => ParquetCompression::Uncompressed,
                    _ => ParquetCompression::Zstd,
                };
                let time_pattern = options.take("partitioning.time_pattern");
                if let Some(pattern) = &time_pattern {
                    validate_time_pattern(pattern)?;
                }
                let time_column = options.take("partitioning.time_column");
                let mut filesystem = FilesystemOptions {
                    path,
                    compression,
                    time_pattern,
                    time_column,
                    bigquery: None,
                };
                filesystem.bigquery = BigQueryOptions::parse(&mut options, &filesystem)?;
                options.finish(&connector, FILESYSTEM_OPTIONS)?;
                if !columns.is_empty() {
                    return Err("a filesystem sink takes its columns from its INSERT query; declare it without a column list".into());
                }
                Ok(Connector::Sink(SinkConnector::Filesystem(filesystem)))
            }
            "blackhole" => {
                one_of("type", options.take("type"), &["sink"], "sink")?;
                options.finish(&connector, &["type"])?;
                if !columns.is_empty() {
                    return Err("a blackhole sink takes its columns from its INSERT query; declare it without a column list".into());
                }
                Ok(Connector::Sink(SinkConnector::Blackhole))
            }
            "redis" => {
                one_of("type", options.take("type"), &["sink"], "sink")?;
                one_of("format", options.take("format"), &["json"], "json")?;
                let address = Redacted::new(options.require("address", &connector)?);
                if url::Url::parse(address.expose()).map(|u| u.scheme().starts_with("redis"))
                    != Ok(true)
                {
                    return Err(format!(
                        "option `address` must be a redis:// or rediss:// (TLS) URL, got `{address}`"
                    ));
                }
                let target = match one_of(
                    "target",
                    options.take("target"),
                    &["string", "list", "hash", "sorted_set"],
                    "",
                )?
                .as_str()
                {
                    "string" => RedisTarget::String,
                    "list" => RedisTarget::List,
                    "hash" => RedisTarget::Hash,
                    _ => RedisTarget::SortedSet,
                };
                let key_prefix = options.require("target.key_prefix", &connector)?;
                let key_column = options.take("target.key_column");
                let field_column = options.take("target.field_column");
                let value_column = options.take("target.value_column");
                let member_column = options.take("target.member_column");
                let score_column = options.take("target.score_column");
                let id_column = options.take("target.id_column");
                let ttl_secs = options.number("target.ttl_secs")?;
                let max_length = options.number("target.max_length")?;
                let operation = match one_of(
                    "target.operation",
                    options.take("target.operation"),
                    &["append", "prepend"],
                    "append",
                )?
                .as_str()
                {
                    "prepend" => ListOperation::Prepend,
                    _ => ListOperation::Append,
                };
                options.finish(&connector, REDIS_OPTIONS)?;
                let prepend = operation == ListOperation::Prepend;
                {
                    use RedisTarget::{Hash, List, SortedSet};
                    for (option, applies_to, given) in [
                        ("target.field_column", Hash, field_column.is_some()),
                        ("target.value_column", Hash, value_column.is_some()),
                        ("target.member_column", SortedSet, member_column.is_some()),
                        ("target.score_column", SortedSet, score_column.is_some()),
                        ("target.operation", List, prepend),
                        ("target.id_column", List, id_column.is_some()),
                    ] {
                        if given && target != applies_to {
                            return Err(format!(
                                "option `{option}` only applies to target `{}`",
                                target_name(applies_to)
                            ));
                        }
                    }
                }
                if max_length.is_some()
                    && !matches!(target, RedisTarget::List | RedisTarget::SortedSet)
                {
                    return Err(
                        "option `target.max_length` only applies to targets `list` and `sorted_set`"
                            .into(),
                    );
                }
                if value_column.is_some() && field_column.is_none() {
                    return Err("option `target.value_column` needs `target.field_column` (without it every column is a field)".into());
                }
                if target == RedisTarget::SortedSet {
                    for (option, value) in [
                        ("target.member_column", &member_column),
                        ("target.score_column", &score_column),
                    ] {
                        if value.is_none() {
                            return Err(format!(
                                "redis target `sorted_set` needs option `{option}`"
                            ));
                        }
                    }
                }
                if !columns.is_empty() {
                    return Err("a redis sink takes its columns from its INSERT query; declare it without a column list".into());
                }
                Ok(Connector::Sink(SinkConnector::Redis(RedisOptions {
                    address,
                    target,
                    key_prefix,
                    key_column,
                    field_column,
                    value_column,
                    member_column,
                    score_column,
                    ttl_secs,
                    max_length,
                    operation,
                    id_column,
                })))
            }
            "kafka" => {
                let parsed = KafkaOptions::parse(&mut options)?;
                options.finish(&connector, kafka::KAFKA_OPTIONS)?;
                if !columns.is_empty() {
                    return Err("a kafka sink takes its columns from its INSERT query; declare it without a column list".into());
                }
                Ok(Connector::Sink(SinkConnector::Kafka(parsed)))
            }
            "webhook" => {
                let parsed = WebhookOptions::parse(&mut options)?;
                options.finish(&connector, webhook::WEBHOOK_OPTIONS)?;
                if !columns.is_empty() {
                    return Err("a webhook sink takes its columns from its INSERT query; declare it without a column list".into());
                }
                Ok(Connector::Sink(SinkConnector::Webhook(parsed)))
            }
            other => Err(format!(
                "unknown connector `{other}`; valid connectors: {}",
                CONNECTORS.join(", ")
            )),
        }
    }
}

/// The name of a target in `target = '...'`.
pub fn target_name(target: RedisTarget) -> &'static str {
    match target {
        RedisTarget::String => "string",
        RedisTarget::List => "list",
        RedisTarget::Hash => "hash",
        RedisTarget::SortedSet => "sorted_set",
    }
}

fn is_simple_identifier(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Rejects strftime patterns chrono cannot format, and path separators that
/// would escape the table directory.
fn validate_time_pattern(pattern: &str) -> Result<(), String> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(pattern).any(|item| matches!(item, Item::Error)) {
        return Err(format!(
            "option `partitioning.time_pattern` is not a valid strftime pattern: `{pattern}`"
        ));
    }
    if pattern.contains("..") || pattern.starts_with('/') {
        return Err(format!(
            "option `partitioning.time_pattern` must stay inside the table path: `{pattern}`"
        ));
    }
    Ok(())
}

//! Options of `connector = 'kafka'`, named as Arroyo names them
//! (`bootstrap_servers`, `topic`, `format`, `sink.commit_mode`,
//! `sink.key_field`, `sink.timestamp_field`), plus librdkafka client settings
//! passed through as `'kafka.<librdkafka key>'`.

use std::collections::BTreeMap;
use std::fmt;

use arrow::datatypes::{DataType, Schema};

use super::{one_of, Options};
use crate::change::{LSN_COLUMN, OP_COLUMN, SEQ_COLUMN};
use crate::values;

pub(super) const KAFKA_OPTIONS: &[&str] = &[
    "connector",
    "bootstrap_servers",
    "topic",
    "type",
    "format",
    "sink.commit_mode",
    "sink.key_field",
    "sink.timestamp_field",
    "topic.partitions",
    "kafka.<librdkafka setting>",
];

/// Client settings engage sets itself: a `kafka.` option may not change them,
/// because the sink's exactly-once argument rests on them.
const RESERVED_CLIENT_SETTINGS: &[&str] = &[
    "bootstrap.servers",
    "enable.idempotence",
    "transactional.id",
    "acks",
    "max.in.flight.requests.per.connection",
];

/// What a message's value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaFormat {
    /// The row as a JSON object, with `_op`, `_lsn` and `_seq`.
    Json,
    /// Debezium's change envelope (`before`, `after`, `op`, `ts_ms`, `source`).
    DebeziumJson,
}

/// What a consumer may see after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// Every change exactly once: on start the sink skips what the topic holds.
    ExactlyOnce,
    /// Every change at least once: on start the sink sends again everything
    /// after the last checkpoint, whether the topic holds it or not.
    AtLeastOnce,
}

/// librdkafka settings given as `'kafka.<key>' = '<value>'`. Values may be
/// secrets (`sasl.password`), so `Debug` shows the keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientSettings(pub BTreeMap<String, String>);

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    pub topic: String,
    pub format: KafkaFormat,
    pub commit_mode: CommitMode,
    /// The output column whose text is the message key (and so chooses the partition).
    pub key_field: Option<String>,
    /// The output column whose time is the message timestamp; defaults to the
    /// driving table's watermark column when the query outputs it.
    pub timestamp_field: Option<String>,
    /// Partitions of the topic when engage creates it (it does when the
    /// topic does not exist); default 1.
    pub partitions: i32,
    pub client: ClientSettings,
}

impl KafkaOptions {
    /// Parses the options left after `connector`; `type` must be `sink`.
    pub(super) fn parse(options: &mut Options) -> Result<KafkaOptions, String> {
        let kind = options.take("type").ok_or_else(|| {
            "connector `kafka` needs option `type`: `'sink'` to write a topic".to_string()
        })?;
        let kind = one_of("type", Some(kind), &["sink", "source"], "sink")?;
        if kind == "source" {
            return Err(
                "a kafka source (`type = 'source'`) is not supported yet: engage reads Postgres \
                 with `connector = 'postgres-cdc'`; a kafka table must be a sink (`type = 'sink'`)"
                    .into(),
            );
        }
        let bootstrap_servers = options.require("bootstrap_servers", "kafka")?;
        if bootstrap_servers.trim().is_empty() {
            return Err(
                "option `bootstrap_servers` is empty; give `host:port[,host:port...]` \
                 (in the mission SQL it comes from ENGAGE_KAFKA_BROKERS)"
                    .into(),
            );
        }
        let topic = options.require("topic", "kafka")?;
        if !is_topic_name(&topic) {
            return Err(format!(
                "option `topic` must be 1-249 letters, digits, `.`, `_` or `-`, got `{topic}`"
            ));
        }
        let format = match one_of(
            "format",
            options.take("format"),
            &["json", "debezium_json"],
            "json",
        )?
        .as_str()
        {
            "debezium_json" => KafkaFormat::DebeziumJson,
            _ => KafkaFormat::Json,
        };
        let commit_mode = match one_of(
            "sink.commit_mode",
            options.take("sink.commit_mode"),
            &["exactly_once", "at_least_once"],
            "exactly_once",
        )?
        .as_str()
        {
            "at_least_once" => CommitMode::AtLeastOnce,
            _ => CommitMode::ExactlyOnce,
        };
        let key_field = options.take("sink.key_field");
        let timestamp_field = options.take("sink.timestamp_field");
        let partitions = match options.number("topic.partitions")? {
            None => 1,
            Some(n) => i32::try_from(n)
                .ok()
                .filter(|n| *n <= 10_000)
                .ok_or_else(|| {
                    format!("option `topic.partitions` must be at most 10000, got {n}")
                })?,
        };
        let keys: Vec<String> = options
            .values
            .keys()
            .filter(|k| k.starts_with("kafka."))
            .cloned()
            .collect();
        let mut client = BTreeMap::new();
        for key in keys {
            let value = options.take(&key).unwrap_or_default();
            let setting = key["kafka.".len()..].to_string();
            if RESERVED_CLIENT_SETTINGS.contains(&setting.as_str()) {
                return Err(format!(
                    "option `{key}` cannot be set: engage sets `{setting}` itself (its exactly-once \
                     delivery depends on it); `bootstrap_servers` names the brokers"
                ));
            }
            client.insert(setting, value);
        }
        Ok(KafkaOptions {
            bootstrap_servers,
            topic,
            format,
            commit_mode,
            key_field,
            timestamp_field,
            partitions,
            client: ClientSettings(client),
        })
    }

    /// Checks the sink's columns against the query's output and returns the
    /// index of the message timestamp column, if any. `watermark` is the
    /// driving table's watermark column; `windowed` whether the query is.
    pub fn check_columns(
        &self,
        schema: &Schema,
        watermark: Option<&str>,
        windowed: bool,
    ) -> Result<Option<usize>, String> {
        if windowed {
            return Err(
                "a kafka sink takes a query's changes, one message per change; a windowed query \
                 (hop/tumble) cannot feed it yet: send windows to a redis or filesystem sink"
                    .into(),
            );
        }
        let names = || {
            let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            names.join(", ")
        };
        for column in [LSN_COLUMN, SEQ_COLUMN] {
            if schema.index_of(column).is_err() {
                return Err(format!(
                    "a kafka sink needs `{LSN_COLUMN}` and `{SEQ_COLUMN}` in its query's output (select them): \
                     every message carries its change's position, which is how a restarted job skips what the \
                     topic already holds; output columns: {}",
                    names()
                ));
            }
        }
        if self.format == KafkaFormat::DebeziumJson && schema.index_of(OP_COLUMN).is_err() {
            return Err(format!(
                "format `debezium_json` needs `{OP_COLUMN}` in the query's output (it becomes the envelope's `op`)"
            ));
        }
        if let Some(key) = &self.key_field {
            let index = schema.index_of(key).map_err(|_| {
                format!(
                    "`sink.key_field` names `{key}`, which is not an output column; output columns: {}",
                    names()
                )
            })?;
            let data_type = schema.field(index).data_type();
            if !values::has_text(data_type) {
                return Err(format!(
                    "`sink.key_field` names `{key}`, of type {data_type}, which cannot be written as text"
                ));
            }
        }
        let timestamp = match (&self.timestamp_field, watermark) {
            (Some(column), _) => Some(schema.index_of(column).map_err(|_| {
                format!(
                    "`sink.timestamp_field` names `{column}`, which is not an output column; output columns: {}",
                    names()
                )
            })?),
            // The watermark column, if the query outputs it.
            (None, Some(column)) => schema.index_of(column).ok(),
            (None, None) => None,
        };
        if let Some(index) = timestamp {
            let field = schema.field(index);
            if !matches!(field.data_type(), DataType::Timestamp(_, _)) {
                return Err(format!(
                    "the message timestamp column `{}` must be a timestamp, not {}",
                    field.name(),
                    field.data_type()
                ));
            }
        }
        Ok(timestamp)
    }
}

/// Kafka's rule for topic names.
fn is_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

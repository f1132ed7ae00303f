//! The `redis` sink: Arroyo's `string`, `list` and `hash` targets, exactly once.
//!
//! Every write is a single `EVALSHA` of [`APPLY_SCRIPT`]: it checks that the
//! sink's position key still holds the position this sink last wrote, applies
//! all rows of the batch, and stores the new position — atomically, since
//! Redis runs a script without interleaving other commands. A replayed batch
//! never reaches Redis (the engine filters input at or below the position),
//! and a retried write whose first attempt did land is recognised by the
//! position already being the new one.
//!
//! Rows are encoded as JSON from Arrow arrays (one buffer per batch); keys are
//! `target.key_prefix` followed by the key column's value. A row whose key
//! column is NULL has no key to go to: it is counted and logged, not written.

use std::time::Duration;

use arrow::array::{Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::json::WriterBuilder;
use arrow::record_batch::RecordBatch;
use rand::Rng;
use redis::aio::ConnectionManager;

use super::{SinkError, SinkState};
use crate::source::Position;
use crate::sql::options::{ListOperation, RedisOptions, RedisTarget};
use crate::sql::plan::QueryPlan;

/// Applies one batch and moves the position, only if the position is still
/// the expected one. KEYS: position key, then one key per row. ARGV: expected
/// position, new position, target, ttl, max length, operation, then per row
/// the value (hash: field and value).
pub const APPLY_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if current == false then current = '' end
if current ~= ARGV[1] then return {0, current} end
local target = ARGV[3]
local ttl = tonumber(ARGV[4])
local maxlen = tonumber(ARGV[5])
local prepend = ARGV[6] == 'prepend'
local touched = {}
for i = 1, #KEYS - 1 do
  local key = KEYS[i + 1]
  if target == 'string' then
    if ttl > 0 then
      redis.call('SET', key, ARGV[6 + i], 'EX', ttl)
    else
      redis.call('SET', key, ARGV[6 + i])
    end
  elseif target == 'list' then
    if prepend then
      redis.call('LPUSH', key, ARGV[6 + i])
    else
      redis.call('RPUSH', key, ARGV[6 + i])
    end
    touched[key] = true
  else
    redis.call('HSET', key, ARGV[5 + 2 * i], ARGV[6 + 2 * i])
    touched[key] = true
  end
end
for key in pairs(touched) do
  if maxlen > 0 then
    if prepend then
      redis.call('LTRIM', key, 0, maxlen - 1)
    else
      redis.call('LTRIM', key, -maxlen, -1)
    end
  end
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[2]}
"#;

/// How long a write keeps retrying transient failures before giving up.
const RETRY_BUDGET: Duration = Duration::from_secs(60);

pub struct RedisSink {
    name: String,
    options: RedisOptions,
    connection: ConnectionManager,
    script_sha: String,
    position_key: String,
    position: Position,
    key_column: Option<usize>,
    field_column: Option<usize>,
    rows_written: u64,
    null_keys: u64,
    /// Reused between writes: JSON of one batch, and one key.
    json: Vec<u8>,
    key: Vec<u8>,
}

impl RedisSink {
    pub async fn open(
        job: &str,
        name: &str,
        options: &RedisOptions,
        query: &QueryPlan,
        restored: Option<&SinkState>,
    ) -> Result<RedisSink, SinkError> {
        let permanent = |message: String| SinkError::Permanent {
            sink: name.to_string(),
            message,
        };
        let client = redis::Client::open(options.address.expose())
            .map_err(|e| permanent(format!("invalid redis address {}: {e}", options.address)))?;
        let mut connection =
            client
                .get_connection_manager()
                .await
                .map_err(|e| SinkError::Transient {
                    sink: name.to_string(),
                    message: format!("failed to connect to redis at {}: {e}", options.address),
                })?;
        let script_sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(APPLY_SCRIPT)
            .query_async(&mut connection)
            .await
            .map_err(|e| permanent(format!("failed to load the apply script into redis: {e}")))?;
        let position_key = format!("engage:job:{job}:position:{name}");
        let stored: Option<String> = redis::cmd("GET")
            .arg(&position_key)
            .query_async(&mut connection)
            .await
            .map_err(|e| permanent(format!("failed to read {position_key}: {e}")))?;
        let position = match &stored {
            None => Position::ZERO,
            Some(text) => Position::from_sortable(text).ok_or_else(|| {
                permanent(format!(
                    "{position_key} holds `{text}`, which is not a position"
                ))
            })?,
        };
        if let Some(restored) = restored {
            if restored.position > position {
                tracing::warn!(
                    sink = name,
                    redis_position = %position,
                    checkpoint_position = %restored.position,
                    "redis holds less than the checkpoint recorded (was redis flushed or restored?); \
                     changes replayed from the checkpoint are applied again, older ones are not"
                );
            }
        }
        let schema = &query.output_schema;
        let column =
            |option: &Option<String>| option.as_ref().and_then(|c| schema.index_of(c).ok());
        Ok(RedisSink {
            name: name.to_string(),
            key_column: column(&options.key_column),
            field_column: column(&options.field_column),
            options: options.clone(),
            connection,
            script_sha,
            position_key,
            position,
            rows_written: 0,
            null_keys: 0,
            json: Vec::new(),
            key: Vec::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn state(&self) -> SinkState {
        SinkState {
            position: self.position,
            staged: Vec::new(),
        }
    }

    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Rows not written because their key column was NULL.
    pub fn null_keys(&self) -> u64 {
        self.null_keys
    }

    pub async fn write(
        &mut self,
        batches: Vec<RecordBatch>,
        upto: Position,
    ) -> Result<(), SinkError> {
        let mut command = redis::cmd("EVALSHA");
        let rows = self.encode(&batches, upto, &mut command)?;
        let mut delay = Duration::from_millis(100);
        let started = std::time::Instant::now();
        loop {
            match command.query_async::<(i64, String)>(&mut self.connection).await {
                Ok((1, _)) => break,
                Ok((_, found)) if found == upto.to_sortable() => break, // an earlier attempt landed
                Ok((_, found)) => {
                    return Err(SinkError::Permanent {
                        sink: self.name.clone(),
                        message: format!(
                            "{} holds `{found}` but this sink last wrote {}: another process is writing \
                             this job's sink (stop it, or give this job another name)",
                            self.position_key,
                            self.position.to_sortable()
                        ),
                    })
                }
                Err(error) if is_transient(&error) && started.elapsed() < RETRY_BUDGET => {
                    let jitter = rand::rng().random_range(0..=delay.as_millis() as u64 / 2);
                    tracing::warn!(sink = %self.name, error = %error, retry_in_ms = delay.as_millis() as u64, "redis write failed; retrying");
                    tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    // Redis restarted and lost its script cache: load it again and retry.
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(APPLY_SCRIPT)
                        .query_async::<String>(&mut self.connection)
                        .await
                        .map_err(|e| self.transient(format!("failed to reload the apply script: {e}")))?;
                }
                Err(error) => {
                    return Err(self.transient(format!(
                        "failed to write to redis at {}: {error}",
                        self.options.address
                    )))
                }
            }
        }
        self.position = upto;
        self.rows_written += rows;
        Ok(())
    }

    fn transient(&self, message: String) -> SinkError {
        SinkError::Transient {
            sink: self.name.clone(),
            message,
        }
    }

    /// Builds the EVALSHA command for `batches`; returns the number of rows in it.
    fn encode(
        &mut self,
        batches: &[RecordBatch],
        upto: Position,
        command: &mut redis::Cmd,
    ) -> Result<u64, SinkError> {
        let mut keys: Vec<Option<StringArray>> = Vec::with_capacity(batches.len());
        let mut fields: Vec<Option<StringArray>> = Vec::with_capacity(batches.len());
        let mut key_count = 0usize;
        for batch in batches {
            let key = self.string_column(batch, self.key_column)?;
            let field = self.string_column(batch, self.field_column)?;
            key_count += (0..batch.num_rows())
                .filter(|&row| key.as_ref().is_none_or(|k| k.is_valid(row)))
                .count();
            keys.push(key);
            fields.push(field);
        }
        command
            .arg(&self.script_sha)
            .arg(key_count + 1)
            .arg(&self.position_key);
        for (batch, key) in batches.iter().zip(&keys) {
            for row in 0..batch.num_rows() {
                match key {
                    Some(key) if key.is_null(row) => continue,
                    Some(key) => {
                        self.key.clear();
                        self.key
                            .extend_from_slice(self.options.key_prefix.as_bytes());
                        self.key.extend_from_slice(key.value(row).as_bytes());
                        command.arg(&self.key[..]);
                    }
                    None => {
                        command.arg(self.options.key_prefix.as_bytes());
                    }
                }
            }
        }
        let target = match self.options.target {
            RedisTarget::String => "string",
            RedisTarget::List => "list",
            RedisTarget::Hash => "hash",
        };
        let operation = match self.options.operation {
            ListOperation::Append => "append",
            ListOperation::Prepend => "prepend",
        };
        let expected = if self.position == Position::ZERO {
            String::new()
        } else {
            self.position.to_sortable()
        };
        command
            .arg(expected)
            .arg(upto.to_sortable())
            .arg(target)
            .arg(self.options.ttl_secs.unwrap_or(0))
            .arg(self.options.max_length.unwrap_or(0))
            .arg(operation);
        let mut rows = 0u64;
        for ((batch, key), field) in batches.iter().zip(&keys).zip(&fields) {
            self.json.clear();
            let mut writer = WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::LineDelimited>(&mut self.json);
            writer.write(batch).map_err(|e| SinkError::Permanent {
                sink: self.name.clone(),
                message: format!("failed to encode rows as JSON: {e}"),
            })?;
            writer.finish().map_err(|e| SinkError::Permanent {
                sink: self.name.clone(),
                message: format!("failed to encode rows as JSON: {e}"),
            })?;
            drop(writer);
            // JSON escapes newlines inside strings, so each line is one row.
            for (row, line) in self
                .json
                .split(|b| *b == b'\n')
                .take(batch.num_rows())
                .enumerate()
            {
                if key.as_ref().is_some_and(|k| k.is_null(row)) {
                    self.null_keys += 1;
                    tracing::warn!(sink = %self.name, "row with a NULL key column not written (filter NULL keys in the query)");
                    continue;
                }
                if let Some(field) = field {
                    command.arg(if field.is_null(row) {
                        ""
                    } else {
                        field.value(row)
                    });
                }
                command.arg(line);
                rows += 1;
            }
        }
        Ok(rows)
    }

    fn string_column(
        &self,
        batch: &RecordBatch,
        index: Option<usize>,
    ) -> Result<Option<StringArray>, SinkError> {
        let Some(index) = index else { return Ok(None) };
        let column =
            cast(batch.column(index), &DataType::Utf8).map_err(|e| SinkError::Permanent {
                sink: self.name.clone(),
                message: format!("key column cannot be used as text: {e}"),
            })?;
        Ok(Some(
            column
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("cast to Utf8")
                .clone(),
        ))
    }
}

fn is_transient(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.is_connection_refusal()
}

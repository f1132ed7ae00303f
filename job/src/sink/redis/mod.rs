//! The `redis` sink: Arroyo's `string`, `list` and `hash` targets, and `sorted_set`, exactly once.
//!
//! Every write is a single `EVALSHA` of [`APPLY_SCRIPT`], so Redis applies it
//! whole, without interleaving other commands. The script has two modes.
//!
//! # Change streams: guarded by the position
//!
//! [`RedisSink::write`] applies rows on top of what the keys hold. The script
//! checks that the sink's position key (`engage:job:<job>:position:<sink>`)
//! still holds the position this sink last wrote, applies all rows of the
//! batch, and stores the new position. A replayed batch never reaches Redis
//! (the engine filters input at or below the position), and a retried write
//! whose first attempt did land is recognised by the position already being
//! the new one.
//!
//! # Closed windows: guarded by the window end
//!
//! [`RedisSink::write_window`] takes the full result of the latest closed
//! window and makes every key the sink writes hold exactly that: each key is
//! deleted and rewritten, keys the previous window wrote that get no rows now
//! are deleted, and readers see either the old window or the new one, never a
//! mix. The hash `engage:job:<job>:window_end` (field: the sink) holds the end
//! of the applied window; a window ending at or before it is skipped, so a
//! replay can neither move a key backwards nor apply a window twice. The set
//! `engage:job:<job>:window_keys:<sink>` remembers the keys of the applied
//! window. The position key moves up to the write's input position, for
//! monitoring; it does not guard windowed writes.
//!
//! The script finds the previous window's keys in that set, so they are not
//! declared in `KEYS`: on Redis Cluster a windowed sink's keys must share a
//! hash slot (a `{tag}` in `target.key_prefix`).
//!
//! # Encoding
//!
//! Keys are `target.key_prefix` followed by the key column's value (the prefix
//! alone without a key column). Values are encoded from Arrow arrays into the
//! command buffer, reusing scratch buffers between writes: rows as JSON
//! (string, list, hash without `target.value_column`), column text (hash
//! fields), scores as Float64 text. A row whose key, member, score (or NaN
//! score) or value is NULL has nowhere to go: it is counted, not written.

use std::time::Duration;

use arrow::datatypes::Schema;
use arrow::record_batch::RecordBatch;
use rand::Rng;
use redis::aio::ConnectionManager;

use super::{SinkError, SinkState};
use crate::change::Position;
use crate::sql::options::{target_name, ListOperation, RedisOptions};
use crate::sql::plan::QueryPlan;

/// Applies the rows of one write. KEYS: position key, window end hash, window
/// keys set, then the keys rows go to. ARGV: mode (`cas` or `window`), guard
/// (expected position, or window end), new position, target, ttl, max length,
/// list operation, sink name, list id field (or empty), then per row: the
/// index of its key among the data keys, the number of values, the values
/// (string: the value; list: the value, or with an id field `+` and the
/// value or `-` and the id to remove; hash: fields and values; sorted set:
/// score and member).
///
/// The guard is checked before anything is written, and no command after it
/// can fail on well-formed input (window mode deletes each key before writing
/// it, so a key of the wrong type cannot stop it halfway).
mod client;
mod encode;
use encode::Encoder;

pub const APPLY_SCRIPT: &str = r#"
local window = ARGV[1] == 'window'
if window then
  local applied = redis.call('HGET', KEYS[2], ARGV[8])
  if applied and tonumber(applied) and tonumber(ARGV[2]) <= tonumber(applied) then
    return {0, applied}
  end
else
  local current = redis.call('GET', KEYS[1])
  if current == false then current = '' end
  if current ~= ARGV[2] then return {0, current} end
end
local target = ARGV[4]
local ttl = tonumber(ARGV[5])
local maxlen = tonumber(ARGV[6])
local prepend = ARGV[7] == 'prepend'
local idfield = ARGV[9]
local function trim(key)
  if maxlen > 0 then
    if target == 'list' then
      if prepend then
        redis.call('LTRIM', key, 0, maxlen - 1)
      else
        redis.call('LTRIM', key, -maxlen, -1)
      end
    elseif target == 'sorted_set' then
      redis.call('ZREMRANGEBYRANK', key, 0, -(maxlen + 1))
    end
  end
end
local written = {}
local i = 10
local count = #ARGV
while i <= count do
  local key = KEYS[3 + tonumber(ARGV[i])]
  local n = tonumber(ARGV[i + 1])
  if window and not written[key] then redis.call('DEL', key) end
  written[key] = true
  if target == 'sorted_set' then
    redis.call('ZADD', key, ARGV[i + 2], ARGV[i + 3])
  elseif target == 'hash' then
    redis.call('HSET', key, unpack(ARGV, i + 2, i + 1 + n))
  elseif target == 'list' then
    -- With an id field, a row is an operation and its value: '+' pushes
    -- the JSON, '-' removes the entries whose id field equals the value
    -- (after trimming, so the list reads as if every row came one by one).
    local op, value = '+', ARGV[i + 2]
    if n == 2 then op, value = ARGV[i + 2], ARGV[i + 3] end
    if op == '-' then
      trim(key)
      local number = tonumber(value)
      for _, entry in ipairs(redis.call('LRANGE', key, 0, -1)) do
        local ok, row = pcall(cjson.decode, entry)
        if ok and type(row) == 'table' and row[idfield] ~= nil
            and (row[idfield] == number or tostring(row[idfield]) == value) then
          redis.call('LREM', key, 0, entry)
        end
      end
    elseif prepend then
      redis.call('LPUSH', key, value)
    else
      redis.call('RPUSH', key, value)
    end
  else
    redis.call('SET', key, ARGV[i + 2])
  end
  i = i + 2 + n
end
for key in pairs(written) do
  trim(key)
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
if not window then
  redis.call('SET', KEYS[1], ARGV[3])
  return {1, ARGV[3]}
end
for _, key in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if not written[key] then redis.call('DEL', key) end
end
redis.call('DEL', KEYS[3])
for key in pairs(written) do redis.call('SADD', KEYS[3], key) end
redis.call('HSET', KEYS[2], ARGV[8], ARGV[2])
local position = redis.call('GET', KEYS[1])
if position == false or position < ARGV[3] then redis.call('SET', KEYS[1], ARGV[3]) end
return {1, ARGV[2]}
"#;

/// How long a write keeps retrying transient failures before giving up.
const RETRY_BUDGET: Duration = Duration::from_secs(60);

/// How long opening a sink waits for a connection to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisSink {
    name: String,
    options: RedisOptions,
    connection: ConnectionManager,
    script_sha: String,
    position_key: String,
    window_end_key: String,
    window_keys_key: String,
    position: Position,
    window_end: Option<i64>,
    rows_written: u64,
    /// Redis held less than the checkpoint recorded at open.
    lost: bool,
    /// How long a write retries transient failures before giving up.
    retry_budget: Duration,
    encoder: Encoder,
}

impl RedisSink {
    pub async fn open(
        job: &str,
        name: &str,
        options: &RedisOptions,
        query: &QueryPlan,
        restored: Option<&SinkState>,
    ) -> Result<RedisSink, SinkError> {
        Self::open_for_schema(job, name, options, &query.output_schema, restored).await
    }

    /// [`RedisSink::open`] for rows of `schema`, without a query plan (tests, tools).
    #[doc(hidden)]
    pub async fn open_for_schema(
        job: &str,
        name: &str,
        options: &RedisOptions,
        schema: &Schema,
        restored: Option<&SinkState>,
    ) -> Result<RedisSink, SinkError> {
        let permanent = |message: String| SinkError::Permanent {
            sink: name.to_string(),
            message,
        };
        options.check_columns(schema).map_err(permanent)?;
        let client = client::client(options.address.expose())
            .map_err(|e| permanent(format!("invalid redis address {}: {e}", options.address)))?;
        // Bounded: the connection manager retries a refused connection for
        // ~10 s by itself, which a job restarting during an outage would
        // spend on every Redis sink before streaming.
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, client.get_connection_manager());
        let unreachable = |message: String| SinkError::Transient {
            sink: name.to_string(),
            message: format!(
                "failed to connect to redis at {}: {message}",
                options.address
            ),
        };
        let mut connection = match connect.await {
            Ok(connected) => connected.map_err(|e| unreachable(e.to_string()))?,
            Err(_) => {
                // The manager hides why; one plain attempt tells (a refused
                // connection, a TLS certificate the client does not trust).
                let why = match tokio::time::timeout(
                    Duration::from_secs(1),
                    client.get_multiplexed_async_connection(),
                )
                .await
                {
                    Ok(Err(error)) => format!(": {error}"),
                    _ => String::new(),
                };
                return Err(unreachable(format!(
                    "no connection within {} s{why}",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
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
        let behind = restored.is_some_and(|restored| restored.detached);
        let lost = restored.is_some_and(|restored| restored.position > position) || behind;
        if behind {
            tracing::warn!(
                sink = name,
                redis_position = %position,
                "this sink was detached while redis was unreachable; the job catches it up from its checkpoints"
            );
        } else if lost {
            tracing::warn!(
                sink = name,
                redis_position = %position,
                checkpoint_position = %restored.map(|r| r.position).unwrap_or_default(),
                "redis holds less than the checkpoint recorded (it restarted without its data, or was flushed \
                 or restored from an older copy); the job rebuilds this sink from its checkpoints"
            );
        }
        let window_end_key = format!("engage:job:{job}:window_end");
        let stored: Option<String> = redis::cmd("HGET")
            .arg(&window_end_key)
            .arg(name)
            .query_async(&mut connection)
            .await
            .map_err(|e| permanent(format!("failed to read {window_end_key}: {e}")))?;
        let window_end = match &stored {
            None => None,
            Some(text) => Some(text.parse::<i64>().map_err(|_| {
                permanent(format!(
                    "{window_end_key} holds `{text}` for this sink, which is not a window end"
                ))
            })?),
        };
        Ok(RedisSink {
            name: name.to_string(),
            encoder: Encoder::new(options, schema),
            options: options.clone(),
            connection,
            script_sha,
            position_key,
            window_keys_key: format!("engage:job:{job}:window_keys:{name}"),
            window_end_key,
            position,
            window_end,
            rows_written: 0,
            lost,
            retry_budget: RETRY_BUDGET,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether Redis held less than the checkpoint recorded when the sink
    /// opened, or the checkpoint says the sink was detached (it missed writes).
    pub fn lost(&self) -> bool {
        self.lost
    }

    /// Makes writes give up on transient failures after `budget` instead of
    /// [`RETRY_BUDGET`].
    pub fn set_retry_budget(&mut self, budget: Duration) {
        self.retry_budget = budget;
    }

    /// Whether the Redis at `address` accepts a connection and answers a
    /// PING within a second (for a sink that could not even open).
    pub async fn reachable_at(address: &str) -> bool {
        let Ok(client) = client::client(address) else {
            return false;
        };
        let ping = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    }

    /// Whether Redis answers a PING within a second.
    pub async fn reachable(&mut self) -> bool {
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut self.connection);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// End (Unix µs) of the last window applied, as read at open and moved by
    /// [`RedisSink::write_window`]; `None` if this sink never wrote a window.
    pub fn window_end(&self) -> Option<i64> {
        self.window_end
    }

    pub fn state(&self) -> SinkState {
        SinkState {
            position: self.position,
            ..SinkState::default()
        }
    }

    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Rows not written because their key column was NULL.
    pub fn null_keys(&self) -> u64 {
        self.encoder.null_keys
    }

    /// Rows not written because their member, score (or a NaN score) or value
    /// column was NULL, or, for a row written as a hash, every column was.
    pub fn null_values(&self) -> u64 {
        self.encoder.null_values
    }

    /// Applies `batches` on top of what the keys hold and moves the position
    /// to `upto`, if the position key still holds this sink's position.
    pub async fn write(
        &mut self,
        batches: Vec<RecordBatch>,
        upto: Position,
    ) -> Result<(), SinkError> {
        let expected = if self.position == Position::ZERO {
            String::new()
        } else {
            self.position.to_sortable()
        };
        let upto_text = upto.to_sortable();
        let mut command = redis::cmd("EVALSHA");
        let rows = self.encode(&batches, &mut command, ["cas", &expected, &upto_text])?;
        let reply = self.run(&command).await?;
        // A refusal that finds no position at all: Redis lost the keys.
        if !reply.applied && reply.found.is_empty() {
            return Err(SinkError::Lost {
                sink: self.name.clone(),
                message: format!(
                    "redis at {} no longer holds {} (this sink last wrote {}): it restarted without its data                      or was flushed, so the sink's keys hold less than the job applied",
                    self.options.address,
                    self.position_key,
                    self.position.to_sortable()
                ),
            });
        }
        // A refusal that finds the new position means an earlier attempt landed.
        if !reply.applied && reply.found != upto_text {
            return Err(self.permanent(format!(
                "{} holds `{}` but this sink last wrote {}: another process is writing \
                 this job's sink (stop it, or give this job another name)",
                self.position_key,
                reply.found,
                self.position.to_sortable()
            )));
        }
        self.position = upto;
        self.rows_written += rows;
        Ok(())
    }

    /// Replaces, atomically, every key this sink writes with the rows of the
    /// window ending at `window_end_micros` (Unix µs). Skips (Ok, no effect)
    /// if a window ending at or after it was already applied. Keys written for
    /// the previous window that get no rows now are deleted, so stale members
    /// leave the rankings. `upto` is the input position (recorded, not guarded).
    pub async fn write_window(
        &mut self,
        batches: Vec<RecordBatch>,
        window_end_micros: i64,
        upto: Position,
    ) -> Result<(), SinkError> {
        if let Some(applied) = self.window_end.filter(|end| window_end_micros <= *end) {
            tracing::debug!(sink = %self.name, window_end = window_end_micros, applied, "window already applied; skipped");
            return Ok(());
        }
        let end_text = window_end_micros.to_string();
        let upto_text = upto.to_sortable();
        let mut command = redis::cmd("EVALSHA");
        let rows = self.encode(&batches, &mut command, ["window", &end_text, &upto_text])?;
        let reply = self.run(&command).await?;
        // After a retry, finding this very window applied means an earlier attempt landed.
        if reply.applied || (reply.retried && reply.found == end_text) {
            self.window_end = Some(window_end_micros);
            self.position = self.position.max(upto);
            self.rows_written += rows;
        } else {
            // Another process applied this window or a later one.
            let found = reply.found.parse::<i64>().ok();
            tracing::debug!(sink = %self.name, window_end = window_end_micros, applied = ?found, "window already applied; skipped");
            self.window_end = self.window_end.max(found);
        }
        Ok(())
    }

    /// Builds the EVALSHA command for `batches` with the mode, guard and new
    /// position in `head`; returns the number of rows in it.
    fn encode(
        &mut self,
        batches: &[RecordBatch],
        command: &mut redis::Cmd,
        head: [&str; 3],
    ) -> Result<u64, SinkError> {
        let (null_keys, null_values) = (self.encoder.null_keys, self.encoder.null_values);
        let columns = self
            .encoder
            .resolve_keys(batches)
            .map_err(|message| self.permanent(message))?;
        command
            .arg(&self.script_sha)
            .arg(3 + self.encoder.key_index.len())
            .arg(&self.position_key)
            .arg(&self.window_end_key)
            .arg(&self.window_keys_key);
        self.encoder.write_keys(command);
        let operation = match self.options.operation {
            ListOperation::Append => "append",
            ListOperation::Prepend => "prepend",
        };
        command
            .arg(head[0])
            .arg(head[1])
            .arg(head[2])
            .arg(target_name(self.options.target))
            .arg(self.options.ttl_secs.unwrap_or(0))
            .arg(self.options.max_length.unwrap_or(0))
            .arg(operation)
            .arg(&self.name)
            .arg(self.options.id_column.as_deref().unwrap_or(""));
        let rows = self
            .encoder
            .write_rows(batches, &columns, command)
            .map_err(|message| self.permanent(message))?;
        let (null_keys, null_values) = (
            self.encoder.null_keys - null_keys,
            self.encoder.null_values - null_values,
        );
        if null_keys > 0 {
            tracing::warn!(sink = %self.name, rows = null_keys, "rows with a NULL key column not written (filter NULL keys in the query)");
        }
        if null_values > 0 {
            tracing::warn!(sink = %self.name, rows = null_values, "rows with a NULL member, score or value not written (filter them in the query)");
        }
        Ok(rows)
    }

    /// Runs one script call, retrying transient failures for the retry budget.
    async fn run(&mut self, command: &redis::Cmd) -> Result<Reply, SinkError> {
        let mut delay = Duration::from_millis(100);
        let started = std::time::Instant::now();
        let mut retried = false;
        if crate::failpoint::reached("redis_in_flight") {
            // Send the write, give it time to reach Redis, then die unanswered.
            let mut connection = self.connection.clone();
            let command = command.clone();
            tokio::spawn(
                async move { command.query_async::<(i64, String)>(&mut connection).await },
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            crate::failpoint::die("redis_in_flight");
        }
        loop {
            // An attempt never outlasts the budget: while Redis is down, the
            // connection manager itself may wait seconds to reconnect.
            let remaining = self
                .retry_budget
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(100));
            let attempt = command.query_async::<(i64, String)>(&mut self.connection);
            let Ok(answer) = tokio::time::timeout(remaining, attempt).await else {
                return Err(self.transient(format!(
                    "redis at {} did not answer within {} ms",
                    self.options.address,
                    self.retry_budget.as_millis()
                )));
            };
            match answer {
                Ok((applied, found)) => {
                    return Ok(Reply {
                        applied: applied == 1,
                        found,
                        retried,
                    })
                }
                Err(error) if is_transient(&error) && started.elapsed() < self.retry_budget => {
                    retried = true;
                    let jitter = rand::rng().random_range(0..=delay.as_millis() as u64 / 2);
                    tracing::warn!(sink = %self.name, error = %error, retry_in_ms = delay.as_millis() as u64, "redis write failed; retrying");
                    tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(error)
                    if error.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    // Redis restarted and lost its script cache: load it again and retry.
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(APPLY_SCRIPT)
                        .query_async::<String>(&mut self.connection)
                        .await
                        .map_err(|e| {
                            self.transient(format!("failed to reload the apply script: {e}"))
                        })?;
                }
                Err(error) => {
                    return Err(self.transient(format!(
                        "failed to write to redis at {}: {error}",
                        self.options.address
                    )))
                }
            }
        }
    }

    fn transient(&self, message: String) -> SinkError {
        SinkError::Transient {
            sink: self.name.clone(),
            message,
        }
    }

    fn permanent(&self, message: String) -> SinkError {
        SinkError::Permanent {
            sink: self.name.clone(),
            message,
        }
    }
}

/// What the script answered.
struct Reply {
    /// Whether the guard let the write through.
    applied: bool,
    /// Applied: the new position or window end. Refused: what the guard found.
    found: String,
    /// Whether an earlier attempt failed in a way that may have applied it.
    retried: bool,
}

fn is_transient(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.is_connection_refusal()
}

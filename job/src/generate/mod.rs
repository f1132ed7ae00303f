//! The load generator behind `engage generate`: it creates the two source tables
//! (`content`, `engagement_events`), seeds a deterministic content catalogue, and
//! streams synthetic engagement events into Postgres as fast as asked.
//!
//! Throughput comes from `COPY ... FROM STDIN` in text format: one COPY per batch,
//! each an autocommitted statement (so each batch is its own transaction and shows
//! up in the replication stream as one commit). Rows are formatted into one reusable
//! buffer on the blocking pool, so the runtime never spends long in formatting and
//! the hot loop allocates nothing per row.
//!
//! Everything random comes from a [`StdRng`](rand::rngs::StdRng) seeded with [`GenerateOptions::seed`]:
//! the same seed against the same `content` table yields the same content ids,
//! slugs and event sequence; only `event_ts` (wall-clock time of the batch) differs.
//! Popularity is Zipf-like over the catalogue (a CDF built once, sampled by binary
//! search); pacing is a token bucket counted in batches that sleeps until the next
//! batch is due and never spins.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use futures::{FutureExt, SinkExt};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

mod events;
pub(crate) use events::EventGenerator;
use events::*;

/// DDL of the two source tables, exactly as in DESIGN.md, plus `REPLICA IDENTITY
/// FULL` on both so updates and deletes carry whole old rows. The `ALTER`s run only
/// when needed: they take an exclusive lock, which must not queue behind a running
/// snapshot reader every time a generator starts.
pub const SCHEMA_SQL: &str = "\
CREATE TABLE IF NOT EXISTS content (
    id              UUID PRIMARY KEY,
    slug            TEXT UNIQUE NOT NULL,
    title           TEXT NOT NULL,
    content_type    TEXT CHECK (content_type IN ('podcast', 'newsletter', 'video')),
    length_seconds  INTEGER,
    publish_ts      TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS engagement_events (
    id           BIGSERIAL PRIMARY KEY,
    content_id   UUID REFERENCES content(id),
    user_id      UUID,
    event_type   TEXT CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    event_ts     TIMESTAMPTZ NOT NULL,
    duration_ms  INTEGER,
    device       TEXT,
    raw_payload  JSONB
);
DO $$
BEGIN
    IF (SELECT relreplident FROM pg_class WHERE oid = 'engagement_events'::regclass) <> 'f' THEN
        ALTER TABLE engagement_events REPLICA IDENTITY FULL;
    END IF;
    IF (SELECT relreplident FROM pg_class WHERE oid = 'content'::regclass) <> 'f' THEN
        ALTER TABLE content REPLICA IDENTITY FULL;
    END IF;
END
$$;
";

const COPY_EVENTS_SQL: &str = "COPY engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) FROM STDIN";

const USER_POOL: usize = 50_000;
const UUID_LEN: usize = 36;
/// Domains keep derived ids of different kinds apart for the same seed and index.
const CONTENT_DOMAIN: u64 = 1;
const USER_DOMAIN: u64 = 2;
const EVENT_TYPES: [(&str, u32); 4] = [("play", 50), ("pause", 20), ("finish", 15), ("click", 15)];
const DEVICES: [(&str, u32); 6] = [
    ("ios", 32),
    ("android", 26),
    ("web-chrome", 20),
    ("web-safari", 9),
    ("web-firefox", 4),
    ("smart-tv", 9),
];
const APP_VERSIONS: [(&str, u32); 4] = [("5.2.1", 55), ("5.2.0", 25), ("5.1.4", 15), ("4.9.0", 5)];
const CONTENT_TYPES: [(&str, u32); 3] = [("podcast", 40), ("newsletter", 35), ("video", 25)];
const ADJECTIVES: [&str; 8] = [
    "quiet", "bright", "hidden", "daily", "slow", "open", "wild", "deep",
];
const NOUNS: [&str; 8] = [
    "harbor", "signal", "garden", "ledger", "frontier", "kitchen", "orbit", "atlas",
];

/// Errors of the load generator. Each names the object it failed on; the
/// `tokio_postgres` cause is the `source` (print with `{:#}` to see it).
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid generate options: {0}")]
    InvalidOptions(String),
    #[error("invalid postgres url")]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("failed to connect to postgres at {target}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to create tables content and engagement_events")]
    Schema(#[source] tokio_postgres::Error),
    #[error("failed to seed table content")]
    SeedContent(#[source] tokio_postgres::Error),
    #[error("failed to insert history into table engagement_events")]
    SeedHistory(#[source] tokio_postgres::Error),
    #[error("table content has no rows to draw events from")]
    NoContent,
    #[error("failed to copy a batch of {rows} events into table engagement_events")]
    CopyEvents {
        rows: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("event generator task failed")]
    GeneratorTask(#[source] tokio::task::JoinError),
}

/// How `engage generate` runs; see [`run`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Events per second; `None` = as fast as Postgres takes them.
    pub rate: Option<u64>,
    /// Stop after this long (whichever of `duration`/`count` comes first).
    pub duration: Option<Duration>,
    /// Stop after this many events; with neither, run until shutdown.
    pub count: Option<u64>,
    /// Content rows to seed (when the table has fewer).
    pub content_items: usize,
    /// Rows per COPY; at low rates batches shrink to `rate / 20` so events trickle.
    pub batch_size: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Exponent `s` of the popularity law: the item of rank `k` has weight `1 / k^s`.
    pub zipf_exponent: f64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            rate: None,
            duration: None,
            count: None,
            content_items: 1000,
            batch_size: 1000,
            seed: 42,
            zipf_exponent: 1.1,
        }
    }
}

impl GenerateOptions {
    fn validate(&self) -> Result<(), GenerateError> {
        let invalid = |message: &str| Err(GenerateError::InvalidOptions(message.to_owned()));
        if self.rate == Some(0) {
            return invalid("rate must be at least 1 event per second");
        }
        if self.batch_size == 0 {
            return invalid("batch_size must be at least 1");
        }
        if !(self.zipf_exponent.is_finite() && self.zipf_exponent >= 0.0) {
            return invalid("zipf_exponent must be a finite number >= 0");
        }
        Ok(())
    }

    /// Rows per COPY: about 20 batches per second when paced, never above `batch_size`.
    fn effective_batch_size(&self) -> usize {
        match self.rate {
            Some(rate) => (rate / 20).clamp(1, self.batch_size as u64) as usize,
            None => self.batch_size,
        }
    }
}

/// One row of table `content`.
#[derive(Clone, Debug)]
pub struct ContentItem {
    /// UUID in text form.
    pub id: String,
    pub slug: String,
    pub title: String,
    /// `podcast`, `newsletter` or `video` (empty if the row has NULL).
    pub content_type: String,
    pub length_seconds: Option<i32>,
}

/// Live counters readable from other tasks (the demo's status line, a
/// progress bar), and controls another task may set (the demo's dashboard).
#[derive(Default, Debug)]
pub struct GenerateProgress {
    /// Events committed so far.
    pub events: AtomicU64,
    /// COPY batches committed so far.
    pub batches: AtomicU64,
    /// While true, no batch is sent.
    pub paused: std::sync::atomic::AtomicBool,
    /// Events per second asked for while running (0: the options' rate).
    /// Only a paced run (`rate` set) follows it.
    pub target_rate: AtomicU64,
}

/// What a finished run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GenerateReport {
    pub events: u64,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
}

/// Creates the source tables if missing and sets their replica identity (idempotent).
pub async fn ensure_schema(client: &Client) -> Result<(), GenerateError> {
    client
        .batch_execute(SCHEMA_SQL)
        .await
        .map_err(GenerateError::Schema)
}

/// Inserts `rows` events with event times spread over the `span` before
/// now, in one statement: history for a backfill to read (`engage demo
/// --history`). Types and devices follow the generator's weights roughly;
/// every event is of an existing content item. Returns the rows inserted.
pub async fn seed_history(
    client: &Client,
    span: Duration,
    rows: u64,
) -> Result<u64, GenerateError> {
    let devices: Vec<&str> = DEVICES
        .iter()
        .flat_map(|(device, weight)| std::iter::repeat_n(*device, *weight as usize))
        .collect();
    let types: Vec<&str> = EVENT_TYPES
        .iter()
        .flat_map(|(kind, weight)| std::iter::repeat_n(*kind, *weight as usize))
        .collect();
    client
        .execute(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device) \
             SELECT c.ids[1 + (i * 7919) % c.n], md5((i % 50000)::text)::uuid, \
                    ($3::text[])[1 + (i * 31) % cardinality($3::text[])], \
                    now() - make_interval(secs => $1::float8 * random()), \
                    (random() * 600000)::int, \
                    ($4::text[])[1 + (i * 17) % cardinality($4::text[])] \
             FROM generate_series(1, $2::bigint) AS i, \
                  (SELECT array_agg(id ORDER BY slug) AS ids, count(*) AS n FROM content) AS c",
            &[&span.as_secs_f64(), &(rows as i64), &types, &devices],
        )
        .await
        .map_err(GenerateError::SeedHistory)
}

/// Inserts `n` content rows if the table has fewer than `n` rows (deterministic from
/// `seed`; conflicts are skipped), then returns every row of `content` ordered by slug.
pub async fn seed_content(
    client: &Client,
    n: usize,
    seed: u64,
) -> Result<Vec<ContentItem>, GenerateError> {
    let existing: i64 = client
        .query_one("SELECT count(*) FROM content", &[])
        .await
        .map_err(GenerateError::SeedContent)?
        .get(0);
    if (existing as u64) < n as u64 {
        let rows = seeded_content(n, seed);
        let column = |f: fn(&(ContentItem, i32)) -> &str| rows.iter().map(f).collect::<Vec<_>>();
        let ids = column(|(item, _)| &item.id);
        let slugs = column(|(item, _)| &item.slug);
        let titles = column(|(item, _)| &item.title);
        let types = column(|(item, _)| &item.content_type);
        let lengths: Vec<Option<i32>> = rows.iter().map(|(item, _)| item.length_seconds).collect();
        let minutes: Vec<i32> = rows.iter().map(|(_, minutes)| *minutes).collect();
        client
            .execute(
                "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) \
                 SELECT r.id::uuid, r.slug, r.title, r.content_type, r.length_seconds, \
                        TIMESTAMPTZ '2024-01-01 00:00:00+00' + make_interval(mins => r.minutes) \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int4[]) \
                      AS r(id, slug, title, content_type, length_seconds, minutes) \
                 ON CONFLICT DO NOTHING",
                &[&ids, &slugs, &titles, &types, &lengths, &minutes],
            )
            .await
            .map_err(GenerateError::SeedContent)?;
    }
    let rows = client
        .query(
            "SELECT id::text, slug, title, content_type, length_seconds FROM content ORDER BY slug",
            &[],
        )
        .await
        .map_err(GenerateError::SeedContent)?;
    Ok(rows
        .iter()
        .map(|row| ContentItem {
            id: row.get(0),
            slug: row.get(1),
            title: row.get(2),
            content_type: row.get::<_, Option<String>>(3).unwrap_or_default(),
            length_seconds: row.get(4),
        })
        .collect())
}

/// Connects to `postgres_url`, ensures the schema, seeds content, then inserts events
/// until `count` or `duration` is reached or `shutdown` resolves. A batch in flight
/// when `shutdown` resolves is finished, not abandoned.
pub async fn run(
    postgres_url: &str,
    options: GenerateOptions,
    progress: Arc<GenerateProgress>,
    shutdown: impl Future<Output = ()>,
) -> Result<GenerateReport, GenerateError> {
    options.validate()?;
    let config: tokio_postgres::Config = postgres_url.parse().map_err(GenerateError::InvalidUrl)?;
    let target = describe_target(&config);
    let (client, connection) =
        config
            .connect(NoTls)
            .await
            .map_err(|source| GenerateError::Connect {
                target: target.clone(),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %error, "generator connection to postgres closed");
        }
    });
    ensure_schema(&client).await?;
    let items = seed_content(&client, options.content_items, options.seed).await?;
    let mut generator = EventGenerator::new(items, options.seed, options.zipf_exponent)?;
    tracing::info!(postgres = %target, rate = ?options.rate, count = ?options.count, "generating events");

    tokio::pin!(shutdown);
    let batch_rows = options.effective_batch_size();
    let start = Instant::now();
    let deadline = options.duration.map(|duration| start + duration);
    let mut pacer = options.rate.map(|rate| Pacer::new(rate, start));
    let mut batch_rows = batch_rows;
    let mut buffer = String::with_capacity(batch_rows * 200);
    let mut sent: u64 = 0;
    loop {
        if progress.paused.load(Ordering::Relaxed) {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if let Some(pacer) = pacer.as_mut() {
                pacer.restart(sent);
            }
            continue;
        }
        let asked = progress.target_rate.load(Ordering::Relaxed);
        if let Some(pacer) = pacer.as_mut() {
            if asked > 0 && asked as f64 != pacer.rate {
                pacer.set_rate(asked, sent);
                batch_rows = GenerateOptions {
                    rate: Some(asked),
                    ..options.clone()
                }
                .effective_batch_size();
            }
        }
        let rows = match options.count {
            Some(count) => (count - sent).min(batch_rows as u64) as usize,
            None => batch_rows,
        };
        if rows == 0 {
            break;
        }
        match pacer.as_mut().map(|pacer| pacer.next_due(sent)) {
            Some(due) => {
                // A batch due after the deadline is never sent: sleep out the deadline.
                let wake = deadline.map_or(due, |deadline| due.min(deadline));
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep_until(wake.into()) => {}
                }
                if wake < due {
                    break;
                }
            }
            None if shutdown.as_mut().now_or_never().is_some() => break,
            None => {}
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            break;
        }

        // Formatting a batch takes longer than a task should hold the runtime;
        // generator and buffer travel to the blocking pool and back.
        let now = Utc::now();
        let moved = (generator, buffer);
        (generator, buffer) = tokio::task::spawn_blocking(move || {
            let (mut generator, mut buffer) = moved;
            buffer.clear();
            generator.write_batch(&mut buffer, rows, now);
            (generator, buffer)
        })
        .await
        .map_err(GenerateError::GeneratorTask)?;
        copy_batch(&client, &buffer)
            .await
            .map_err(|source| GenerateError::CopyEvents { rows, source })?;
        sent += rows as u64;
        progress.events.fetch_add(rows as u64, Ordering::Relaxed);
        progress.batches.fetch_add(1, Ordering::Relaxed);
    }

    let elapsed_secs = start.elapsed().as_secs_f64();
    let events_per_sec = sent as f64 / elapsed_secs.max(f64::EPSILON);
    tracing::info!(events = sent, events_per_sec, "generator finished");
    Ok(GenerateReport {
        events: sent,
        elapsed_secs,
        events_per_sec,
    })
}

/// One COPY, autocommitted: the batch is one transaction.
pub(crate) async fn copy_batch(client: &Client, data: &str) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in(COPY_EVENTS_SQL).await?;
    futures::pin_mut!(sink);
    sink.send(Bytes::copy_from_slice(data.as_bytes())).await?;
    sink.finish().await
}

/// "host:port/dbname" for messages; never the user or password.
fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => match config.get_hostaddrs().first() {
            Some(addr) => addr.to_string(),
            None => "<no host>".to_owned(),
        },
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{dbname}")
}

/// Token bucket counted in events: the batch starting at event `sent` is due at
/// `base + (sent - base_events) / rate`. A generator that falls more than a second
/// behind (a slow Postgres) restarts the schedule instead of bursting to catch up.
struct Pacer {
    rate: f64,
    base: Instant,
    base_events: u64,
}

impl Pacer {
    fn new(rate: u64, start: Instant) -> Self {
        Self {
            rate: rate as f64,
            base: start,
            base_events: 0,
        }
    }

    /// Paces from now on at `rate`, `sent` events in.
    fn set_rate(&mut self, rate: u64, sent: u64) {
        self.rate = rate.max(1) as f64;
        self.restart(sent);
    }

    /// Paces from now, `sent` events in (after a pause: no catching up).
    fn restart(&mut self, sent: u64) {
        (self.base, self.base_events) = (Instant::now(), sent);
    }

    fn next_due(&mut self, sent: u64) -> Instant {
        let due = self.base + Duration::from_secs_f64((sent - self.base_events) as f64 / self.rate);
        let now = Instant::now();
        if now > due + Duration::from_secs(1) {
            (self.base, self.base_events) = (now, sent);
            return now;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::fmt::Write as _;

    fn sample_ranks(seed: u64, draws: usize) -> Vec<usize> {
        let zipf = ZipfSampler::new(1000, 1.1);
        let mut rng = StdRng::seed_from_u64(seed);
        (0..draws).map(|_| zipf.sample(&mut rng)).collect()
    }

    fn catalogue(n: usize) -> Vec<ContentItem> {
        seeded_content(n, 42)
            .into_iter()
            .map(|(item, _)| item)
            .collect()
    }

    #[test]
    fn zipf_sampling_is_skewed_and_deterministic_per_seed() {
        let mut counts = vec![0usize; 1000];
        sample_ranks(7, 100_000)
            .iter()
            .for_each(|&rank| counts[rank] += 1);
        assert!(
            counts[0] > counts[9] && counts[9] > counts[99],
            "{:?}",
            &counts[..10]
        );
        let top_ten_percent: usize = counts[..100].iter().sum();
        assert!(
            top_ten_percent > 60_000,
            "top 100 ranks drew {top_ten_percent} of 100000"
        );
        assert_eq!(sample_ranks(3, 1000), sample_ranks(3, 1000));
        assert_ne!(sample_ranks(3, 1000), sample_ranks(4, 1000));
        assert_eq!(ZipfSampler::new(4, 0.0).cdf, vec![0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn copy_text_escapes_backslash_tab_newline_and_carriage_return() {
        let mut out = String::new();
        push_copy_text(&mut out, "a\\b\tc\nd\re \"ünï\"");
        assert_eq!(out, "a\\\\b\\tc\\nd\\re \"ünï\"");
        out.clear();
        let _ = write!(
            CopyText(&mut out),
            r#"{{"note":"{}"}}"#,
            "tab\there \\u0041"
        );
        assert_eq!(out, r#"{"note":"tab\there \\u0041"}"#);
    }

    #[test]
    fn event_ts_is_utc_with_microseconds() {
        let ts = DateTime::from_timestamp(1_709_622_489, 123_456_789).expect("valid time");
        let mut out = String::new();
        write_event_ts(&mut out, ts);
        assert_eq!(out, "2024-03-05 07:08:09.123456+00");
    }

    #[test]
    fn seeded_content_is_deterministic_with_uuids_mixed_types_and_odd_lengths() {
        let items = catalogue(1000);
        let again = catalogue(1000);
        assert!(items
            .iter()
            .zip(&again)
            .all(|(a, b)| a.id == b.id && a.slug == b.slug));
        assert_ne!(seeded_content(1, 43)[0].0.id, items[0].id);
        let slugs: std::collections::HashSet<_> = items.iter().map(|item| &item.slug).collect();
        assert_eq!(slugs.len(), 1000);
        let id = &items[0].id;
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, vec![8, 4, 4, 4, 12], "{id}");
        assert!(
            &id[14..15] == "4" && matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "{id}"
        );
        let nulls = items
            .iter()
            .filter(|item| item.length_seconds.is_none())
            .count();
        let zeros = items
            .iter()
            .filter(|item| item.length_seconds == Some(0))
            .count();
        assert!(
            (60..150).contains(&nulls) && zeros > 5,
            "{nulls} NULL, {zeros} zero lengths"
        );
        for kind in ["podcast", "newsletter", "video"] {
            assert!(
                items
                    .iter()
                    .filter(|item| item.content_type == kind)
                    .count()
                    > 150,
                "{kind}"
            );
        }
    }

    #[test]
    fn batches_are_copy_lines_with_the_expected_mix() {
        let items = catalogue(200);
        let ts = Utc::now();
        let mut generator = EventGenerator::new(items.clone(), 9, 1.1).expect("items");
        let mut out = String::new();
        generator.write_batch(&mut out, 20_000, ts);
        let (mut plays, mut null_durations) = (0, 0);
        for line in out.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 7, "{line}");
            assert!(items.iter().any(|item| item.id == fields[0]), "{line}");
            assert_eq!(fields[1].len(), UUID_LEN);
            assert!(["play", "pause", "finish", "click"].contains(&fields[2]));
            plays += usize::from(fields[2] == "play");
            match fields[4] {
                "\\N" => null_durations += 1,
                ms => assert!(ms.parse::<i32>().is_ok_and(|ms| ms >= 0), "{line}"),
            }
            assert!(DEVICES.iter().any(|(device, _)| *device == fields[5]));
            let payload: serde_json::Value = serde_json::from_str(fields[6]).expect("json");
            assert!(payload["session"].is_u64() && payload["app_version"].is_string());
        }
        assert_eq!(out.lines().count(), 20_000);
        assert!((9_000..11_000).contains(&plays), "{plays} plays");
        assert!(
            (700..1_300).contains(&null_durations),
            "{null_durations} NULL durations"
        );

        let mut again = String::new();
        let mut same = EventGenerator::new(items, 9, 1.1).expect("items");
        same.write_batch(&mut again, 20_000, ts);
        assert_eq!(out, again, "same seed, same events");
    }

    #[test]
    fn low_rates_use_small_batches_and_zero_rate_is_refused() {
        let options = |rate| GenerateOptions {
            rate,
            ..GenerateOptions::default()
        };
        assert_eq!(options(Some(1000)).effective_batch_size(), 50);
        assert_eq!(options(Some(5)).effective_batch_size(), 1);
        assert_eq!(options(Some(1_000_000)).effective_batch_size(), 1000);
        assert_eq!(options(None).effective_batch_size(), 1000);
        assert!(options(Some(0)).validate().is_err());
    }

    #[test]
    fn target_description_hides_credentials() {
        let url = "postgres://alice:s3cret@127.0.0.1:5433/shop";
        let config: tokio_postgres::Config = url.parse().expect("url");
        assert_eq!(describe_target(&config), "127.0.0.1:5433/shop");
        let config: tokio_postgres::Config =
            "host=/tmp user=bob password=s3cret".parse().expect("kv");
        assert_eq!(describe_target(&config), "/tmp:5432/bob");
    }

    /// Runs only when `ENGAGE_TEST_POSTGRES_URL` names a scratch database; prints
    /// the measured throughput (a figure, not an assertion).
    #[tokio::test]
    async fn generates_into_real_postgres_when_available() {
        let Ok(url) = std::env::var("ENGAGE_TEST_POSTGRES_URL") else {
            println!("skipped: ENGAGE_TEST_POSTGRES_URL not set");
            return;
        };
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
        tokio::spawn(connection);
        ensure_schema(&client).await.expect("schema");
        ensure_schema(&client).await.expect("schema is idempotent");
        let count_sql = "SELECT count(*) FROM engagement_events";
        let before: i64 = client
            .query_one(count_sql, &[])
            .await
            .expect("count")
            .get(0);

        let progress = Arc::new(GenerateProgress::default());
        let options = GenerateOptions {
            count: Some(200_000),
            ..GenerateOptions::default()
        };
        let report = run(&url, options, progress.clone(), std::future::pending()).await;
        let report = report.expect("generate");
        println!(
            "generated {} events in {:.2}s: {:.0} events/s",
            report.events, report.elapsed_secs, report.events_per_sec
        );
        assert_eq!(report.events, 200_000);
        assert_eq!(progress.events.load(Ordering::Relaxed), 200_000);
        assert_eq!(progress.batches.load(Ordering::Relaxed), 200);
        let after: i64 = client
            .query_one(count_sql, &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(after - before, 200_000);
        let content = seed_content(&client, 1000, 42).await.expect("content");
        assert!(content.len() >= 1000);
        assert!(content.windows(2).all(|pair| pair[0].slug < pair[1].slug));

        // Paced: 1000 events at 2000/s go out as 10 batches of 100, the last due at 0.45 s.
        let options = GenerateOptions {
            rate: Some(2000),
            count: Some(1000),
            ..Default::default()
        };
        let progress = Arc::new(GenerateProgress::default());
        let report = run(&url, options, progress.clone(), std::future::pending()).await;
        assert_eq!(report.as_ref().map(|report| report.events).ok(), Some(1000));
        assert_eq!(progress.batches.load(Ordering::Relaxed), 10);
        let elapsed = report.expect("paced").elapsed_secs;
        assert!(elapsed >= 0.4, "paced run took {elapsed}s");

        // Escaped text survives a COPY round trip through the server.
        client
            .batch_execute("CREATE TEMP TABLE escaped (value TEXT)")
            .await
            .expect("temp");
        let tricky = "tab\there\nnewline \\backslash\rcr";
        let mut line = String::new();
        push_copy_text(&mut line, tricky);
        line.push('\n');
        let sink = client
            .copy_in("COPY escaped (value) FROM STDIN")
            .await
            .expect("copy");
        futures::pin_mut!(sink);
        sink.send(Bytes::from(line)).await.expect("send");
        sink.finish().await.expect("finish");
        let back: String = client
            .query_one("SELECT value FROM escaped", &[])
            .await
            .expect("read")
            .get(0);
        assert_eq!(back, tricky);
    }
}

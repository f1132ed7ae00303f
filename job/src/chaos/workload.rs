//! The fault suite's workload: every kind of change the mission pipeline
//! must get right, seeded, committed while faults are injected.
//!
//! One task on one connection commits everything, one statement after the
//! other, so the order of its commits is the order in which it issued them.
//! Between `COPY` batches of ordinary inserts (the load generator's, stamped
//! with the wall clock) it mixes in, with seeded probabilities:
//!
//! - **updates** of recent events (`duration_ms`, `event_type`),
//! - **deletes** of recent events,
//! - **content changes**: `content_type` and `length_seconds` of an item that
//!   events keep arriving for, so events before and after join differently,
//! - **out-of-order** inserts, 100 ms behind the newest event time (inside
//!   the 200 ms watermark delay: on time),
//! - **late** inserts, [`LATE_BY`] behind (far behind any watermark),
//! - and in the bad-input scenario, **bad** inserts of every kind the
//!   mission SQL checks.
//!
//! # What keeps the oracle exact
//!
//! The oracle ([`super::oracle`]) rebuilds the expected outputs from Postgres
//! alone. Three rules of this workload keep every expectation free of
//! timing:
//!
//! - Updates and deletes touch only events of the current minute, and none
//!   in the last [`MINUTE_MARGIN`] of a minute: the windows holding them are
//!   open, and stay open until well after the change (a 1-minute KPI window
//!   closes only once event time passes its end).
//! - A change is late or on time by a wide margin (100 ms early or 30 s
//!   late against a 200 ms delay), never near the watermark, where the job's
//!   batch boundaries would decide.
//! - The run ends with a **quiet tail**: one last batch of inserts
//!   [`TAIL_AHEAD`] after the last change, so the final windows close after
//!   every update and delete.
//!
//! # History
//!
//! [`install_history`] adds triggers that log every change of `content`, and
//! every update and delete of `engagement_events`, with the old and new rows
//! and the number of event ids allocated before it: with one writer, that
//! places each logged change exactly among the inserts (ordered by id).
//! Triggers run in the writing transaction, so a commit lost to a crash
//! loses its log entry too.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use crate::generate::{self, EventGenerator};

/// How far behind the newest event time a late insert is stamped.
pub const LATE_BY: Duration = Duration::from_secs(30);
/// How far behind the newest event time an out-of-order insert is stamped.
pub const OUT_OF_ORDER_BY: Duration = Duration::from_millis(100);
/// No update or delete in the last seconds of a minute.
pub const MINUTE_MARGIN: Duration = Duration::from_secs(3);
/// The last batch is stamped this far after the last change.
pub const TAIL_AHEAD: Duration = Duration::from_secs(2);

/// The history table and its triggers (idempotent).
pub const HISTORY_SQL: &str = "\
CREATE TABLE IF NOT EXISTS engage_oracle_history (
    seq           BIGSERIAL PRIMARY KEY,
    table_name    TEXT NOT NULL,
    op            TEXT NOT NULL,
    events_before BIGINT NOT NULL,
    old_row       JSONB,
    new_row       JSONB
);
CREATE OR REPLACE FUNCTION engage_oracle_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO engage_oracle_history (table_name, op, events_before, old_row, new_row)
    VALUES (TG_TABLE_NAME,
            CASE TG_OP WHEN 'INSERT' THEN 'c' WHEN 'UPDATE' THEN 'u' ELSE 'd' END,
            (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM engagement_events_id_seq),
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS engage_oracle_content ON content;
CREATE TRIGGER engage_oracle_content AFTER INSERT OR UPDATE OR DELETE ON content
    FOR EACH ROW EXECUTE FUNCTION engage_oracle_log();
DROP TRIGGER IF EXISTS engage_oracle_events ON engagement_events;
CREATE TRIGGER engage_oracle_events AFTER UPDATE OR DELETE ON engagement_events
    FOR EACH ROW EXECUTE FUNCTION engage_oracle_log();
";

/// Adds the history triggers; call before content is seeded.
pub async fn install_history(db: &Client) -> Result<(), tokio_postgres::Error> {
    db.batch_execute(HISTORY_SQL).await
}

/// The bad events of the bad-input scenario: the CHECK each fails, and its
/// `VALUES` (`$1` is a valid content id, `$2` the event time).
const BAD_KINDS: [(&str, &str); 6] = [
    (
        "content_missing",
        "NULL, gen_random_uuid(), 'play', $2, 1000, 'web', '{}'",
    ),
    (
        "unknown_event_type",
        "$1::text::uuid, gen_random_uuid(), 'swipe', $2, 1000, 'web', '{}'",
    ),
    (
        "bad_duration",
        "$1::text::uuid, gen_random_uuid(), 'play', $2, -5, 'web', '{}'",
    ),
    (
        "payload_not_object",
        "$1::text::uuid, gen_random_uuid(), 'play', $2, 1000, 'web', '[1, 2]'",
    ),
    (
        "unknown_content",
        "gen_random_uuid(), gen_random_uuid(), 'play', $2, 1000, 'web', '{}'",
    ),
    (
        "bad_duration",
        "$1::text::uuid, gen_random_uuid(), 'click', $2, 999999999, 'web', '{}'",
    ),
];
/// 2 MB payloads are few: each is 2 MB of WAL and of dead-letter output.
const LARGE_PAYLOADS: u64 = 5;

/// What the workload mixes in, per batch of inserts.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Ordinary inserts to make; `None` runs until stopped.
    pub count: Option<u64>,
    /// Ordinary inserts per second.
    pub rate: u64,
    pub seed: u64,
    /// Content items seeded (and drawn from).
    pub content_items: usize,
    /// Updates and deletes, each per 1,000 inserts.
    pub updates_per_mille: u32,
    pub deletes_per_mille: u32,
    /// Content changes, out-of-order and late inserts, each per batch (0..1).
    pub content_change_chance: f64,
    pub out_of_order_chance: f64,
    pub late_chance: f64,
    /// Bad inserts per 1,000 inserts (0: none).
    pub bad_per_mille: u32,
}

impl WorkloadOptions {
    /// The mix the fault suite uses.
    pub fn mixed(count: Option<u64>, rate: u64, seed: u64, content_items: usize) -> Self {
        WorkloadOptions {
            count,
            rate,
            seed,
            content_items,
            updates_per_mille: 10,
            deletes_per_mille: 5,
            content_change_chance: 0.1,
            out_of_order_chance: 0.2,
            late_chance: 0.1,
            bad_per_mille: 0,
        }
    }
}

/// The workload's own log: what it committed (as far as it knows: a commit
/// lost to a Postgres crash is in here but not in Postgres; the oracle reads
/// Postgres).
#[derive(Debug, Default)]
pub struct WorkloadLog {
    /// Ordinary (COPY) inserts: what fault moments are timed by.
    pub inserts: AtomicU64,
    /// Every change committed: inserts of any kind, updates, deletes and
    /// content changes.
    pub changes: AtomicU64,
    /// Bad events: id → the CHECK it was made to fail.
    pub bad: Mutex<BTreeMap<i64, String>>,
    /// (WAL insert position after a batch's commit, changes committed so far).
    pub wal: Mutex<Vec<(u64, u64)>>,
}

impl WorkloadLog {
    fn committed(&self, changes: u64) {
        self.changes.fetch_add(changes, Ordering::Relaxed);
    }

    /// Changes committed with a position in `(from, to]`, as far as the
    /// per-batch log resolves them.
    pub fn changes_between(&self, from: u64, to: u64) -> u64 {
        let wal = self.wal.lock().expect("log lock");
        let upto = |lsn: u64| {
            wal.iter()
                .take_while(|(at, _)| *at <= lsn)
                .last()
                .map_or(0, |(_, n)| *n)
        };
        upto(to).saturating_sub(upto(from))
    }
}

/// A running workload.
pub struct Workload {
    pub log: Arc<WorkloadLog>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), String>>,
}

impl Workload {
    /// Starts the workload against `url` (schema and content already there).
    pub fn start(url: &str, options: WorkloadOptions) -> Workload {
        let log = Arc::new(WorkloadLog::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(url.to_string(), options, log.clone(), stopped));
        Workload { log, stop, task }
    }

    pub fn is_done(&self) -> bool {
        self.task.is_finished()
    }

    /// Ordinary inserts committed so far.
    pub fn inserted(&self) -> u64 {
        self.log.inserts.load(Ordering::Relaxed)
    }

    /// Waits for the workload to make its count (or to stop); a workload
    /// that failed or panicked is an error.
    pub async fn wait_done(&mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(error) => Err(format!("the workload task failed: {error}")),
        }
    }

    /// Stops it after its quiet tail; see [`Workload::wait_done`].
    pub async fn stop(mut self) -> Result<(), String> {
        let _ = self.stop.send(true);
        self.wait_done().await
    }
}

/// A batch of ordinary inserts: its ids and event time.
#[derive(Clone, Copy)]
struct Batch {
    first: i64,
    last: i64,
    ts: DateTime<Utc>,
}

/// The workload's state across reconnections.
struct State {
    rng: StdRng,
    generator: EventGenerator,
    options: WorkloadOptions,
    log: Arc<WorkloadLog>,
    recent: VecDeque<Batch>,
    deleted: HashSet<i64>,
    /// Newest event time committed.
    newest: Option<DateTime<Utc>>,
    valid_content: String,
    large_payload: String,
    buffer: String,
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The open connection in `db`, reconnecting if it closed (Postgres
/// restarted); `None` after a short pause if Postgres refuses for now.
async fn connected<'a>(db: &'a mut Option<Client>, url: &str) -> Option<&'a Client> {
    if db.as_ref().is_none_or(Client::is_closed) {
        match connect(url).await {
            Ok(client) => *db = Some(client),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                return None;
            }
        }
    }
    db.as_ref()
}

async fn run(
    url: String,
    options: WorkloadOptions,
    log: Arc<WorkloadLog>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), String> {
    let db = connect(&url)
        .await
        .map_err(|e| format!("workload: failed to connect: {e}"))?;
    let items = generate::seed_content(&db, options.content_items, options.seed)
        .await
        .map_err(|e| format!("workload: {e}"))?;
    let valid_content = items[0].id.clone();
    let generator =
        EventGenerator::new(items, options.seed, 1.1).map_err(|e| format!("workload: {e}"))?;
    let mut state = State {
        rng: StdRng::seed_from_u64(options.seed ^ 0x000C_4A05),
        generator,
        log,
        recent: VecDeque::new(),
        deleted: HashSet::new(),
        newest: None,
        valid_content,
        large_payload: format!("{{\"blob\": \"{}\"}}", "x".repeat(2 * 1024 * 1024)),
        buffer: String::new(),
        options,
    };
    let mut db = Some(db);
    let batch_rows = (state.options.rate / 20).clamp(1, 1000);
    let started = Instant::now();
    let (mut base, mut base_sent) = (started, 0u64);
    loop {
        let sent = state.log.inserts.load(Ordering::Relaxed);
        let remaining = state.options.count.map(|c| c.saturating_sub(sent));
        if remaining == Some(0) || *stopped.borrow() {
            break;
        }
        let rows = remaining.map_or(batch_rows, |r| r.min(batch_rows)) as usize;
        let mut due =
            base + Duration::from_secs_f64((sent - base_sent) as f64 / state.options.rate as f64);
        if Instant::now() > due + Duration::from_secs(1) {
            // Behind (a Postgres restart): restart the schedule, do not burst.
            (base, base_sent, due) = (Instant::now(), sent, Instant::now());
        }
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        let Some(client) = connected(&mut db, &url).await else {
            continue;
        };
        if let Err(error) = step(client, &mut state, rows, Utc::now()).await {
            eprintln!("[chaos] workload: {error}; reconnecting");
            db = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The quiet tail: inserts only, stamped after every change above.
    let tail = state.newest.unwrap_or_else(Utc::now) + delta(TAIL_AHEAD);
    for attempt in 0..100 {
        let Some(client) = connected(&mut db, &url).await else {
            continue;
        };
        match copy(client, &mut state, 10, tail).await {
            Ok(_) => return Ok(()),
            Err(error) if attempt < 99 => {
                eprintln!("[chaos] workload tail: {error}; retrying");
                db = None;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(error) => return Err(format!("workload: the quiet tail failed: {error}")),
        }
    }
    Err("workload: the quiet tail never committed".into())
}

fn delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).expect("a small duration")
}

/// One batch of ordinary inserts at `now`, then what the dice say.
async fn step(
    db: &Client,
    state: &mut State,
    rows: usize,
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    copy(db, state, rows, now).await?;
    let options = state.options.clone();
    let per_batch = |per_mille: u32| rows as f64 * f64::from(per_mille) / 1000.0;
    for _ in 0..draws(&mut state.rng, per_batch(options.updates_per_mille)) {
        if let Some(id) = mutable_event(state, now) {
            let types = ["play", "pause", "finish", "click"];
            let event_type = types[state.rng.random_range(0..types.len())];
            let duration: Option<i32> =
                (!state.rng.random_bool(0.1)).then(|| state.rng.random_range(0..3_600_000));
            let n = db
                .execute(
                    "UPDATE engagement_events SET duration_ms = $2, event_type = $3 WHERE id = $1",
                    &[&id, &duration, &event_type],
                )
                .await?;
            state.log.committed(n);
        }
    }
    for _ in 0..draws(&mut state.rng, per_batch(options.deletes_per_mille)) {
        if let Some(id) = mutable_event(state, now) {
            let n = db
                .execute("DELETE FROM engagement_events WHERE id = $1", &[&id])
                .await?;
            state.deleted.insert(id);
            state.log.committed(n);
        }
    }
    if state.rng.random_bool(options.content_change_chance) {
        if let Some(id) = recent_event(state) {
            let types = ["podcast", "newsletter", "video"];
            let content_type = types[state.rng.random_range(0..types.len())];
            let roll: f64 = state.rng.random();
            let length: Option<i32> = if roll < 0.1 {
                None
            } else if roll < 0.15 {
                Some(0)
            } else {
                Some(state.rng.random_range(60..5_400))
            };
            let n = db
                .execute(
                    "UPDATE content SET content_type = $2, length_seconds = $3 \
                     WHERE id = (SELECT content_id FROM engagement_events WHERE id = $1)",
                    &[&id, &content_type, &length],
                )
                .await?;
            state.log.committed(n);
        }
    }
    let newest = state.newest.unwrap_or(now);
    for (chance, behind) in [
        (options.out_of_order_chance, OUT_OF_ORDER_BY),
        (options.late_chance, LATE_BY),
    ] {
        if state.rng.random_bool(chance) {
            if let Some(id) = recent_event(state) {
                let ts = newest - delta(behind);
                let n = db
                    .execute(
                        "INSERT INTO engagement_events \
                             (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) \
                         SELECT content_id, user_id, event_type, $2::text::timestamptz, duration_ms, device, raw_payload \
                         FROM engagement_events WHERE id = $1",
                        &[&id, &ts.to_rfc3339()],
                    )
                    .await?;
                state.log.committed(n);
            }
        }
    }
    for _ in 0..draws(&mut state.rng, per_batch(options.bad_per_mille)) {
        bad_event(db, state, now).await?;
    }
    Ok(())
}

/// A whole number of draws with mean `mean`.
fn draws(rng: &mut StdRng, mean: f64) -> u64 {
    let whole = mean.floor();
    whole as u64 + u64::from(rng.random_bool((mean - whole).clamp(0.0, 1.0)))
}

/// COPYs `rows` ordinary inserts stamped `ts` and logs them.
async fn copy(
    db: &Client,
    state: &mut State,
    rows: usize,
    ts: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    state.buffer.clear();
    state.generator.write_batch(&mut state.buffer, rows, ts);
    generate::copy_batch(db, &state.buffer).await?;
    let row = db
        .query_one(
            "SELECT currval('engagement_events_id_seq'), pg_current_wal_insert_lsn()::text",
            &[],
        )
        .await?;
    let last: i64 = row.get(0);
    let lsn = crate::change::parse_lsn(row.get(1)).unwrap_or(0);
    state.log.inserts.fetch_add(rows as u64, Ordering::Relaxed);
    state.log.committed(rows as u64);
    state
        .log
        .wal
        .lock()
        .expect("log lock")
        .push((lsn, state.log.changes.load(Ordering::Relaxed)));
    state.recent.push_back(Batch {
        first: last - rows as i64 + 1,
        last,
        ts,
    });
    while state.recent.len() > 200 {
        state.recent.pop_front();
    }
    state.newest = Some(state.newest.map_or(ts, |n| n.max(ts)));
    Ok(())
}

/// An event of the current minute that may be updated or deleted now, if
/// the minute is not about to end.
fn mutable_event(state: &mut State, now: DateTime<Utc>) -> Option<i64> {
    let minute = now.with_second(0)?.with_nanosecond(0)?;
    if now + delta(MINUTE_MARGIN) >= minute + TimeDelta::minutes(1) {
        return None;
    }
    let candidates: Vec<Batch> = state
        .recent
        .iter()
        .filter(|b| b.ts >= minute && b.ts <= now)
        .copied()
        .collect();
    for _ in 0..4 {
        let batch = candidates.get(state.rng.random_range(0..candidates.len().max(1)))?;
        let id = state.rng.random_range(batch.first..=batch.last);
        if !state.deleted.contains(&id) {
            return Some(id);
        }
    }
    None
}

/// A recently inserted ordinary event (to copy a content id from).
fn recent_event(state: &mut State) -> Option<i64> {
    let batch = state
        .recent
        .get(state.rng.random_range(0..state.recent.len().max(1)))?;
    Some(state.rng.random_range(batch.first..=batch.last))
}

/// Inserts one bad event and logs the CHECK it fails.
async fn bad_event(
    db: &Client,
    state: &mut State,
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let large_so_far = state
        .log
        .bad
        .lock()
        .expect("log lock")
        .values()
        .filter(|r| *r == "payload_too_large")
        .count() as u64;
    let now = now.to_rfc3339();
    let insert = "INSERT INTO engagement_events \
                  (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload) VALUES";
    let (reason, id): (&str, i64) = if large_so_far < LARGE_PAYLOADS && state.rng.random_bool(0.02)
    {
        let sql = format!(
            "{insert} ($1::text::uuid, gen_random_uuid(), 'play', $2::text::timestamptz, 1000, 'web', $3::text::jsonb) RETURNING id"
        );
        let row = db
            .query_one(&sql, &[&state.valid_content, &now, &state.large_payload])
            .await?;
        ("payload_too_large", row.get(0))
    } else {
        let (reason, values) = BAD_KINDS[state.rng.random_range(0..BAD_KINDS.len())];
        let sql =
            format!("{insert} ({values}) RETURNING id").replace("$2", "$2::text::timestamptz");
        let row = if values.contains("$1") {
            db.query_one(&sql, &[&state.valid_content, &now]).await?
        } else {
            db.query_one(&sql.replace("$2", "$1"), &[&now]).await?
        };
        (reason, row.get(0))
    };
    state
        .log
        .bad
        .lock()
        .expect("log lock")
        .insert(id, reason.to_string());
    state.log.committed(1);
    Ok(())
}

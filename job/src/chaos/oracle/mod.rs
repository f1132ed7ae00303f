//! The oracle: what every sink must hold, computed from the events Postgres
//! holds at the end of a scenario, compared with what the sinks hold.
//!
//! - `enriched_events` (Parquet): every good event exactly once.
//! - `recent_events` (Redis lists): per content item, the ids of its 50 newest
//!   good events, newest first (ids follow commit order: one writer).
//! - `top_content`, `top_devices`, `content_type_engagement` (Redis windows):
//!   for the window the sink last applied (its end is in
//!   `engage:job:<job>:window_end`), the aggregate over the good events in
//!   that window, minus late events (which by design go to `late_events`
//!   instead of windows). Scores agree within 1e-6 relative; at the 100th
//!   place of `top_content`, members tied within that tolerance may swap.
//! - `late_events` and `dead_letter` (Parquet): each event at most once;
//!   `dead_letter` holds exactly the injected bad events, with their reasons.
//!
//! A difference counts as *lost* (the sink holds less) or *duplicated* (the
//! sink holds more, or something twice).

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::{Array, Int64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use serde::Serialize;

use super::world::{World, JOB};
use super::{context, ChaosError};

const WINDOW_MICROS: i64 = 10 * 60 * 1_000_000;
const RECENT_LENGTH: usize = 50;
const TOP_N: usize = 100;

/// How one sink compares with the oracle.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SinkCheck {
    pub sink: String,
    /// Rows, entries or members the oracle expects.
    pub expected: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Anything else that differs (order of a list, a missing window).
    pub other: u64,
    pub note: String,
}

impl SinkCheck {
    fn new(sink: &str) -> SinkCheck {
        SinkCheck {
            sink: sink.to_string(),
            ..SinkCheck::default()
        }
    }

    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.other == 0
    }
}

/// What the oracle found beyond the sink checks.
#[derive(Debug, Default)]
pub struct Verdict {
    pub sinks: Vec<SinkCheck>,
    /// Events in Postgres, good and bad.
    pub events: u64,
    pub late: u64,
    /// Dead-lettered events: id → reason.
    pub dead_letter: BTreeMap<i64, String>,
}

/// Compares every sink with the oracle. `bad` are the injected bad events
/// (id → the CHECK they fail), excluded from every good output.
pub async fn check(world: &World, bad: &BTreeMap<i64, String>) -> Result<Verdict, ChaosError> {
    let db = world.db().await?;
    let outputs = Outputs::open(world).await?;
    let bad_ids: Vec<i64> = bad.keys().copied().collect();
    let mut verdict = Verdict {
        events: db
            .query_one("SELECT count(*) FROM engagement_events", &[])
            .await
            .map_err(context("failed to count events"))?
            .get::<_, i64>(0) as u64,
        ..Verdict::default()
    };

    // enriched_events: every good event exactly once.
    let good: Vec<i64> = db
        .query(
            "SELECT id FROM engagement_events WHERE NOT (id = ANY($1))",
            &[&bad_ids],
        )
        .await
        .map_err(context("failed to read the good events"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let written = outputs
        .id_counts("SELECT id, count(*) FROM enriched_events GROUP BY id")
        .await?;
    verdict
        .sinks
        .push(exactly_once("enriched_events", &good, &written));

    // late_events: each at most once; their ids leave the window oracle.
    let late = outputs.row_ids("SELECT \"row\" FROM late_events").await?;
    let mut late_check = SinkCheck::new("late_events");
    let distinct: HashSet<i64> = late.iter().map(|(id, _)| *id).collect();
    late_check.duplicated = (late.len() - distinct.len()) as u64;
    late_check.expected = distinct.len() as u64;
    late_check.note = format!("{} late events (not in windows, by design)", distinct.len());
    verdict.late = distinct.len() as u64;
    verdict.sinks.push(late_check);

    // dead_letter: exactly the injected events, with their reasons.
    let dead = outputs
        .row_ids("SELECT \"row\", reason FROM dead_letter")
        .await?;
    let mut dead_check = SinkCheck::new("dead_letter");
    dead_check.expected = bad.len() as u64;
    for (id, reason) in &dead {
        if verdict.dead_letter.insert(*id, reason.clone()).is_some() {
            dead_check.duplicated += 1;
        }
    }
    for (id, reason) in bad {
        match verdict.dead_letter.get(id) {
            None => dead_check.lost += 1,
            Some(found) if found != reason => {
                dead_check.other += 1;
                if dead_check.note.is_empty() {
                    dead_check.note = format!("event {id}: reason {found}, expected {reason}");
                }
            }
            Some(_) => {}
        }
    }
    dead_check.duplicated += verdict
        .dead_letter
        .keys()
        .filter(|id| !bad.contains_key(id))
        .count() as u64;
    verdict.sinks.push(dead_check);

    let mut redis = world.redis().await?;
    verdict
        .sinks
        .push(recent_lists(&db, &mut redis, &bad_ids).await?);

    let mut excluded = bad_ids.clone();
    excluded.extend(distinct);
    for (sink, key, sql, top) in [
        (
            "top_content",
            "engage:top_content:10m",
            "SELECT e.content_id::text, coalesce(sum(e.duration_ms / 1000.0), 0)::float8 AS score",
            true,
        ),
        (
            "top_devices",
            "engage:top_devices:10m",
            "SELECT coalesce(e.device, 'unknown'), count(*)::float8",
            false,
        ),
        (
            "content_type_engagement",
            "engage:content_type:10m",
            "SELECT coalesce(c.content_type, 'unknown'), coalesce(sum(e.duration_ms / 1000.0), 0)::float8",
            false,
        ),
    ] {
        let check = window(&db, &mut redis, sink, key, sql, top, &excluded).await?;
        verdict.sinks.push(check);
    }
    Ok(verdict)
}

/// Each of `expected` exactly once in `written` (id → times written).
fn exactly_once(sink: &str, expected: &[i64], written: &HashMap<i64, u64>) -> SinkCheck {
    let mut check = SinkCheck::new(sink);
    check.expected = expected.len() as u64;
    let expected: HashSet<i64> = expected.iter().copied().collect();
    let mut lost = Vec::new();
    for id in &expected {
        match written.get(id) {
            None => lost.push(*id),
            Some(&n) => check.duplicated += n - 1,
        }
    }
    check.lost = lost.len() as u64;
    if let (Some(first), Some(last)) = (lost.iter().min(), lost.iter().max()) {
        check.note = format!("lost ids between {first} and {last}");
    }
    for (id, n) in written {
        if !expected.contains(id) {
            check.duplicated += n;
        }
    }
    check
}

async fn recent_lists(
    db: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    bad: &[i64],
) -> Result<SinkCheck, ChaosError> {
    let mut check = SinkCheck::new("recent_events");
    let rows = db
        .query(
            "SELECT content_id::text, (array_agg(id ORDER BY id DESC))[1:50] \
             FROM engagement_events WHERE content_id IS NOT NULL AND NOT (id = ANY($1)) \
             GROUP BY content_id",
            &[&bad],
        )
        .await
        .map_err(context("failed to compute the recent lists"))?;
    let oracle: Vec<(String, Vec<i64>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut pipe = redis::pipe();
    for (content, _) in &oracle {
        pipe.cmd("LRANGE")
            .arg(format!("engage:recent:{content}"))
            .arg(0)
            .arg(-1);
    }
    let lists: Vec<Vec<String>> = pipe
        .query_async(redis)
        .await
        .map_err(context("failed to read the recent lists"))?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("engage:recent:*")
        .query_async(redis)
        .await
        .map_err(context("failed to list the recent lists"))?;
    check.duplicated += keys.len().saturating_sub(oracle.len()) as u64;
    for ((content, expected), entries) in oracle.iter().zip(lists) {
        check.expected += expected.len().min(RECENT_LENGTH) as u64;
        let found: Vec<i64> = entries.iter().filter_map(|e| json_id(e)).collect();
        let distinct: HashSet<i64> = found.iter().copied().collect();
        check.duplicated += (found.len() - distinct.len()) as u64;
        let want: HashSet<i64> = expected.iter().copied().collect();
        check.lost += want.difference(&distinct).count() as u64;
        check.duplicated += distinct.difference(&want).count() as u64;
        if found.len() == expected.len() && &found != expected && distinct == want {
            check.other += 1;
            check.note = format!("engage:recent:{content} is out of order");
        }
    }
    Ok(check)
}

/// Compares a windowed sink with the oracle aggregate for its applied window.
async fn window(
    db: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    sink: &str,
    key: &str,
    select: &str,
    top: bool,
    excluded: &[i64],
) -> Result<SinkCheck, ChaosError> {
    let mut check = SinkCheck::new(sink);
    let end: Option<String> = redis::cmd("HGET")
        .arg(format!("engage:job:{JOB}:window_end"))
        .arg(sink)
        .query_async(redis)
        .await
        .map_err(context("failed to read the window ends"))?;
    let Some(end) = end.and_then(|e| e.parse::<i64>().ok()) else {
        check.other = 1;
        check.note = "no window applied".into();
        return Ok(check);
    };
    let sql = format!(
        "{select} FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id \
         WHERE e.content_id IS NOT NULL AND NOT (e.id = ANY($3)) \
           AND (extract(epoch FROM e.event_ts) * 1000000)::int8 >= $1 \
           AND (extract(epoch FROM e.event_ts) * 1000000)::int8 < $2 \
         GROUP BY 1"
    );
    let rows = db
        .query(&sql, &[&(end - WINDOW_MICROS), &end, &excluded])
        .await
        .map_err(context(format!("failed to compute the oracle of {sink}")))?;
    let mut all: Vec<(String, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // The job's order: score descending, then member bytes ascending.
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let (expected, boundary) = if top && all.len() > TOP_N {
        (&all[..TOP_N], Some(all[TOP_N - 1].1))
    } else {
        (&all[..], None)
    };
    let found: Vec<(String, f64)> = if top || sink == "top_devices" {
        redis::cmd("ZRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(redis)
            .await
    } else {
        redis::cmd("HGETALL").arg(key).query_async(redis).await
    }
    .map_err(context(format!("failed to read {key}")))?;
    let found: HashMap<String, f64> = found.into_iter().collect();
    let oracle_all: HashMap<&str, f64> = all.iter().map(|(m, s)| (m.as_str(), *s)).collect();
    let tied = |score: f64| boundary.is_some_and(|b| close(score, b));
    check.expected = expected.len() as u64;
    for (member, score) in expected {
        match found.get(member) {
            None if tied(*score) => {}
            None => check.lost += 1,
            Some(got) if close(*got, *score) => {}
            Some(got) if got > score => check.duplicated += 1,
            Some(_) => check.lost += 1,
        }
    }
    for (member, got) in &found {
        if expected.iter().any(|(m, _)| m == member) {
            continue;
        }
        match oracle_all.get(member.as_str()) {
            Some(score) if tied(*score) && close(*got, *score) => {}
            _ => check.duplicated += 1,
        }
    }
    check.note = format!("window ending {end}");
    Ok(check)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// The `id` of a JSON row.
fn json_id(row: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(row)
        .ok()?
        .get("id")?
        .as_i64()
}

/// DataFusion over the job's filesystem outputs.
struct Outputs {
    ctx: datafusion::prelude::SessionContext,
}

impl Outputs {
    async fn open(world: &World) -> Result<Outputs, ChaosError> {
        let data = world.data_dir().display().to_string();
        let redis = world.redis.url();
        let spec = crate::sql::parse_job(JOB, crate::demo::ENGAGEMENT_SQL, &|name| match name {
            "ENGAGE_DATA_DIR" => Some(data.clone()),
            "ENGAGE_POSTGRES_URL" => Some(world.postgres_url.clone()),
            "ENGAGE_REDIS_URL" => Some(redis.clone()),
            _ => None,
        })
        .map_err(context("failed to parse the mission SQL"))?;
        let (ctx, _) = crate::query::session_for(&spec).await;
        Ok(Outputs { ctx })
    }

    /// Rows of a query; a table with no files yet reads as empty.
    async fn rows(&self, sql: &str) -> Result<Vec<arrow::record_batch::RecordBatch>, ChaosError> {
        match self.ctx.sql(sql).await {
            Ok(frame) => frame
                .collect()
                .await
                .map_err(context(format!("failed to run `{sql}`"))),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// `SELECT id, count` → id → count.
    async fn id_counts(&self, sql: &str) -> Result<HashMap<i64, u64>, ChaosError> {
        let mut counts = HashMap::new();
        for batch in self.rows(sql).await? {
            let ids: Int64Array = cast_as(batch.column(0), &DataType::Int64)?;
            let n: Int64Array = cast_as(batch.column(1), &DataType::Int64)?;
            for row in 0..batch.num_rows() {
                counts.insert(ids.value(row), n.value(row) as u64);
            }
        }
        Ok(counts)
    }

    /// `SELECT "row"[, text]` → (id of the JSON row, text), one per row.
    async fn row_ids(&self, sql: &str) -> Result<Vec<(i64, String)>, ChaosError> {
        let mut out = Vec::new();
        for batch in self.rows(sql).await? {
            let rows: StringArray = cast_as(batch.column(0), &DataType::Utf8)?;
            let extra = if batch.num_columns() > 1 {
                Some(cast_as::<StringArray>(batch.column(1), &DataType::Utf8)?)
            } else {
                None
            };
            for row in 0..batch.num_rows() {
                let id = json_id(rows.value(row)).ok_or_else(|| {
                    ChaosError::Failed(format!("an output row has no id: {}", rows.value(row)))
                })?;
                let text = extra.as_ref().map(|e| e.value(row).to_string());
                out.push((id, text.unwrap_or_default()));
            }
        }
        Ok(out)
    }
}

/// `column` cast to `data_type`, as its concrete array type `A`.
fn cast_as<A: Array + Clone + 'static>(
    column: &arrow::array::ArrayRef,
    data_type: &DataType,
) -> Result<A, ChaosError> {
    let cast = cast(column, data_type).map_err(context(format!("not castable to {data_type}")))?;
    Ok(cast
        .as_any()
        .downcast_ref::<A>()
        .expect("a cast yields its type's array")
        .clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_once_counts_missing_twice_and_unexpected() {
        let written = HashMap::from([(1, 1), (2, 2), (9, 1)]);
        let check = exactly_once("s", &[1, 2, 3], &written);
        assert_eq!((check.expected, check.lost, check.duplicated), (3, 1, 2));
        assert!(!check.ok());
        let clean = exactly_once("s", &[1, 2], &HashMap::from([(1, 1), (2, 1)]));
        assert!(clean.ok());
    }

    #[test]
    fn ids_come_from_json_rows() {
        assert_eq!(json_id(r#"{"id":42,"content_id":"x"}"#), Some(42));
        assert_eq!(json_id("not json"), None);
    }
}

//! The windowed outputs: the three 10-minute sliding windows in Redis, the
//! `kpi` Parquet table of every closed tumbling window, and the latest KPI
//! window of each timeframe in Redis.

use std::collections::HashMap;

use super::model::{Contribution, Enriched, Expected};
use super::outputs::{close, close_opt, Columns, Outputs};
use super::{
    context, floor_to, opt_text, Bounds, ChaosError, SinkCheck, JOB, MINUTE, SLIDE_MICROS, TOP_N,
    WINDOW_MICROS,
};

/// The KPI timeframes: Redis sink, key, width.
pub(super) const TIMEFRAMES: [(&str, &str, &str, i64); 4] = [
    ("1m", "kpi_1m_latest", "engage:kpi:1m", MINUTE),
    ("15m", "kpi_15m_latest", "engage:kpi:15m", 15 * MINUTE),
    ("1h", "kpi_1h_latest", "engage:kpi:1h", 60 * MINUTE),
    ("24h", "kpi_24h_latest", "engage:kpi:24h", 24 * 60 * MINUTE),
];

/// A sliding-window Redis sink of the mission SQL.
pub(super) struct HopSink {
    sink: &'static str,
    key: &'static str,
    /// Sorted set (else a hash of field → value).
    sorted_set: bool,
    /// Keep the top N only.
    top: Option<usize>,
    /// The group of a contribution, and what it adds (a sum, else a count).
    group: fn(&Enriched) -> String,
    sum: bool,
}

pub(super) const HOP_SINKS: [HopSink; 4] = [
    HopSink {
        sink: "top_content",
        key: "engage:top_content:10m",
        sorted_set: true,
        top: Some(TOP_N),
        group: |e| e.content_id.clone().unwrap_or_default(),
        sum: true,
    },
    HopSink {
        sink: "top_devices",
        key: "engage:top_devices:10m",
        sorted_set: true,
        top: None,
        group: |e| e.device.clone().unwrap_or_else(|| "unknown".into()),
        sum: false,
    },
    HopSink {
        sink: "top_device_families",
        key: "engage:top_device_families:10m",
        sorted_set: true,
        top: None,
        group: |e| device_family(e.device.as_deref()).unwrap_or_else(|| "unknown".into()),
        sum: false,
    },
    HopSink {
        sink: "content_type_engagement",
        key: "engage:content_type:10m",
        sorted_set: false,
        top: None,
        group: |e| e.content_type.clone().unwrap_or_else(|| "unknown".into()),
        sum: true,
    },
];

/// The window end a Redis sink says it holds (`engage:job:<job>:window_end`).
async fn applied_end(
    redis: &mut redis::aio::MultiplexedConnection,
    sink: &str,
) -> Result<Option<i64>, ChaosError> {
    let end: Option<String> = redis::cmd("HGET")
        .arg(format!("engage:job:{JOB}:window_end"))
        .arg(sink)
        .query_async(redis)
        .await
        .map_err(context("failed to read the window ends"))?;
    end.map(|e| {
        e.parse::<i64>().map_err(|_| {
            ChaosError::Failed(format!("the window end of {sink} is `{e}`, not a number"))
        })
    })
    .transpose()
}

/// Checks that a window end is one the data (or the wall clock) closed:
/// between the last window the data closes and the last the clock can have.
fn check_end(
    check: &mut SinkCheck,
    applied: Option<i64>,
    lowest: Option<i64>,
    highest: Option<i64>,
) -> Option<i64> {
    match (applied, lowest, highest) {
        (Some(end), Some(low), Some(high)) if end >= low && end <= high.max(low) => Some(end),
        // The data closed no window yet; the wall clock may have closed one.
        (Some(end), None, Some(high)) if end <= high => Some(end),
        (None, None, _) => None,
        (applied, low, high) => {
            check.wrong(|| {
                format!(
                    "holds the window ending {}, but the data closes windows up to {} (the wall clock at most {})",
                    opt_text(&applied),
                    opt_text(&low),
                    opt_text(&high)
                )
            });
            None
        }
    }
}

/// A hop window sink: the window it holds, and its contents.
pub(super) async fn hop_window(
    redis: &mut redis::aio::MultiplexedConnection,
    expected: &mut Expected,
    bounds: &Bounds,
    spec: &HopSink,
) -> Result<SinkCheck, ChaosError> {
    let mut check = SinkCheck::new(spec.sink);
    let applied = applied_end(redis, spec.sink).await?;
    let lowest = bounds.data.map(|w| floor_to(w, SLIDE_MICROS));
    let highest = bounds.highest().map(|w| floor_to(w, SLIDE_MICROS));
    let Some(end) = check_end(&mut check, applied, lowest, highest) else {
        return Ok(check);
    };
    let contributions = expected.window(end - WINDOW_MICROS, end);
    // group → (net rows, sum of non-NULL values).
    let mut groups: HashMap<String, (i64, f64)> = HashMap::new();
    for c in contributions {
        let entry = groups.entry((spec.group)(&c.row)).or_default();
        entry.0 += c.sign;
        entry.1 += c.sign as f64 * c.row.engagement_seconds.unwrap_or(0.0);
    }
    let mut all: Vec<(String, f64)> = groups
        .into_iter()
        .filter(|(_, (rows, _))| *rows > 0)
        .map(|(group, (rows, sum))| (group, if spec.sum { sum } else { rows as f64 }))
        .collect();
    // The job's order: score descending, then member ascending.
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let (want, boundary) = match spec.top {
        Some(n) if all.len() > n => (&all[..n], Some(all[n - 1].1)),
        _ => (&all[..], None),
    };
    let found: Vec<(String, f64)> = if spec.sorted_set {
        redis::cmd("ZRANGE")
            .arg(spec.key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(redis)
            .await
    } else {
        redis::cmd("HGETALL").arg(spec.key).query_async(redis).await
    }
    .map_err(context(format!("failed to read {}", spec.key)))?;
    let found: HashMap<String, f64> = found.into_iter().collect();
    let oracle_all: HashMap<&str, f64> = all.iter().map(|(m, s)| (m.as_str(), *s)).collect();
    let tied = |score: f64| boundary.is_some_and(|b| close(score, b));
    check.expected = want.len() as u64;
    for (member, score) in want {
        match found.get(member) {
            None if tied(*score) => {}
            None => check.lost += 1,
            Some(got) if close(*got, *score) => {}
            Some(got) => check.wrong(|| format!("{member}: {got}, expected {score}")),
        }
    }
    for (member, got) in &found {
        if want.iter().any(|(m, _)| m == member) {
            continue;
        }
        match oracle_all.get(member.as_str()) {
            Some(score) if tied(*score) && close(*got, *score) => {}
            _ => check.duplicated += 1,
        }
    }
    check.note = format!("window ending {end}; {}", check.note);
    Ok(check)
}

/// What `device_family(device)` (udfs/device_family) returns, written again
/// from its documentation.
fn device_family(device: Option<&str>) -> Option<String> {
    let device = device?.trim().to_ascii_lowercase();
    let base = device.split('-').next().unwrap_or("");
    let family = match base {
        "ios" | "android" | "iphone" | "ipad" => "mobile",
        "web" => "web",
        "tv" | "roku" | "firetv" | "appletv" | "chromecast" | "smarttv" => "tv",
        _ => "other",
    };
    Some(family.to_string())
}

/// The median of a multiset of values (counts may have been retracted to
/// zero), as `percentile_cont(0.5)`: the mean of the middle two for an even count.
fn median(values: &HashMap<u64, i64>) -> Option<f64> {
    let mut all: Vec<f64> = Vec::new();
    for (bits, count) in values {
        for _ in 0..(*count).max(0) {
            all.push(f64::from_bits(*bits));
        }
    }
    if all.is_empty() {
        return None;
    }
    all.sort_by(f64::total_cmp);
    let middle = all.len() / 2;
    Some(if all.len() % 2 == 1 {
        all[middle]
    } else {
        (all[middle - 1] + all[middle]) / 2.0
    })
}

/// The KPI figures of one tumbling window.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Kpi {
    events: i64,
    plays: i64,
    finishes: i64,
    distinct_users: i64,
    engagement_seconds: f64,
    avg_engagement_seconds: Option<f64>,
    avg_engagement_pct: Option<f64>,
    /// Only the 1-minute KPI has it (the UDAF `median_engagement`).
    median_engagement_seconds: Option<f64>,
}

impl Kpi {
    fn of(contributions: &[&Contribution], with_median: bool) -> Option<Kpi> {
        let mut kpi = Kpi {
            events: 0,
            plays: 0,
            finishes: 0,
            distinct_users: 0,
            engagement_seconds: 0.0,
            avg_engagement_seconds: None,
            avg_engagement_pct: None,
            median_engagement_seconds: None,
        };
        let mut users: HashMap<&str, i64> = HashMap::new();
        let mut seconds: HashMap<u64, i64> = HashMap::new();
        let (mut seconds_n, mut pct_sum, mut pct_n) = (0i64, 0.0, 0i64);
        for c in contributions {
            let row = &c.row;
            kpi.events += c.sign;
            match row.event_type.as_deref() {
                Some("play") => kpi.plays += c.sign,
                Some("finish") => kpi.finishes += c.sign,
                _ => {}
            }
            if let Some(user) = &row.user_id {
                *users.entry(user).or_default() += c.sign;
            }
            if let Some(s) = row.engagement_seconds {
                kpi.engagement_seconds += c.sign as f64 * s;
                seconds_n += c.sign;
                *seconds.entry(s.to_bits()).or_default() += c.sign;
            }
            if let Some(p) = row.engagement_pct {
                pct_sum += c.sign as f64 * p;
                pct_n += c.sign;
            }
        }
        kpi.distinct_users = users.values().filter(|n| **n > 0).count() as i64;
        kpi.avg_engagement_seconds =
            (seconds_n > 0).then(|| kpi.engagement_seconds / seconds_n as f64);
        kpi.avg_engagement_pct = (pct_n > 0).then(|| pct_sum / pct_n as f64);
        if with_median {
            kpi.median_engagement_seconds = median(&seconds);
        }
        (kpi.events > 0).then_some(kpi)
    }

    fn matches(&self, other: &Kpi) -> bool {
        self.events == other.events
            && self.plays == other.plays
            && self.finishes == other.finishes
            && self.distinct_users == other.distinct_users
            && close(self.engagement_seconds, other.engagement_seconds)
            && close_opt(self.avg_engagement_seconds, other.avg_engagement_seconds)
            && close_opt(self.avg_engagement_pct, other.avg_engagement_pct)
            && close_opt(
                self.median_engagement_seconds,
                other.median_engagement_seconds,
            )
    }
}

/// A closed tumbling window: its start, its figures, and whether only the
/// wall clock could have closed it.
pub(super) type ClosedWindow = (i64, Kpi, bool);

/// Per timeframe of [`TIMEFRAMES`], the windows the oracle expects closed;
/// both KPI outputs are checked against them.
pub(super) fn closed_kpi_windows(
    expected: &mut Expected,
    bounds: &Bounds,
) -> Vec<Vec<ClosedWindow>> {
    TIMEFRAMES
        .iter()
        .map(|&(_, _, _, width)| closed_windows(expected, bounds, width))
        .collect()
}

/// Every window of `width` the oracle expects closed.
fn closed_windows(expected: &mut Expected, bounds: &Bounds, width: i64) -> Vec<ClosedWindow> {
    let Some(highest) = bounds.highest() else {
        return Vec::new();
    };
    let data = bounds.data.unwrap_or(i64::MIN);
    let starts: std::collections::BTreeSet<i64> = expected
        .contributions
        .iter()
        .map(|c| floor_to(c.row.event_ts, width))
        .filter(|start| start + width <= highest)
        .collect();
    let mut out = Vec::new();
    for start in starts {
        let contributions = expected.window(start, start + width);
        if let Some(kpi) = Kpi::of(&contributions, width == MINUTE) {
            out.push((start, kpi, start + width > data));
        }
    }
    out
}

/// The `kpi` Parquet table: every closed window of every timeframe once.
pub(super) async fn kpi_table(
    outputs: &Outputs,
    closed: &[Vec<ClosedWindow>],
) -> Result<SinkCheck, ChaosError> {
    let mut check = SinkCheck::new("kpi");
    let mut found: HashMap<(String, i64), Vec<Kpi>> = HashMap::new();
    let sql = "SELECT timeframe, window_start, events, plays, finishes, distinct_users, engagement_seconds, \
               avg_engagement_seconds, avg_engagement_pct, median_engagement_seconds FROM kpi";
    for batch in outputs.rows("kpi", sql).await? {
        let c = Columns(&batch);
        let (frames, starts) = (c.strings("timeframe")?, c.micros("window_start")?);
        let (events, plays, finishes, users) = (
            c.ints("events")?,
            c.ints("plays")?,
            c.ints("finishes")?,
            c.ints("distinct_users")?,
        );
        let (seconds, avg_s, avg_p, median) = (
            c.floats("engagement_seconds")?,
            c.floats("avg_engagement_seconds")?,
            c.floats("avg_engagement_pct")?,
            c.floats("median_engagement_seconds")?,
        );
        for row in 0..batch.num_rows() {
            found
                .entry((
                    frames[row].clone().unwrap_or_default(),
                    starts[row].unwrap_or_default(),
                ))
                .or_default()
                .push(Kpi {
                    events: events[row].unwrap_or_default(),
                    plays: plays[row].unwrap_or_default(),
                    finishes: finishes[row].unwrap_or_default(),
                    distinct_users: users[row].unwrap_or_default(),
                    engagement_seconds: seconds[row].unwrap_or_default(),
                    avg_engagement_seconds: avg_s[row],
                    avg_engagement_pct: avg_p[row],
                    median_engagement_seconds: median[row],
                });
        }
    }
    for ((timeframe, ..), windows) in TIMEFRAMES.iter().zip(closed) {
        for (start, want, optional) in windows {
            let (start, optional) = (*start, *optional);
            let held = found
                .remove(&(timeframe.to_string(), start))
                .unwrap_or_default();
            if held.is_empty() && optional {
                continue;
            }
            check.expected += 1;
            match held.split_first() {
                None => check.lost += 1,
                Some((first, rest)) => {
                    check.duplicated += rest.len() as u64;
                    if !first.matches(want) {
                        check.wrong(|| {
                            format!("{timeframe} window at {start}: {first:?}, expected {want:?}")
                        });
                    }
                }
            }
        }
    }
    // Windows nobody expected (not closed, or without events).
    check.duplicated += found.values().map(|v| v.len() as u64).sum::<u64>();
    Ok(check)
}

/// Parses a timestamp as the Redis hash holds it (Arrow's text form).
fn parse_time(text: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_micros());
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(text, f).ok())
        .map(|t| t.and_utc().timestamp_micros())
}

/// A `engage:kpi:<timeframe>` hash: the latest closed window's figures.
pub(super) async fn kpi_latest(
    redis: &mut redis::aio::MultiplexedConnection,
    windows: &[ClosedWindow],
    timeframe: &str,
    sink: &str,
    key: &str,
    width: i64,
) -> Result<SinkCheck, ChaosError> {
    let mut check = SinkCheck::new(sink);
    let lowest = windows
        .iter()
        .rev()
        .find(|(_, _, optional)| !optional)
        .map(|(s, _, _)| s + width);
    let highest = windows.last().map(|(s, _, _)| s + width);
    let fields: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(redis)
        .await
        .map_err(context(format!("failed to read {key}")))?;
    if fields.is_empty() && lowest.is_none() {
        check.note = "no window closed yet".into();
        return Ok(check);
    }
    check.expected = 1;
    if fields.is_empty() {
        check.lost = 1;
        check.note = format!(
            "{key} is missing; windows up to {} closed",
            opt_text(&lowest)
        );
        return Ok(check);
    }
    let Some(end) = fields.get("window_end").and_then(|t| parse_time(t)) else {
        check.wrong(|| format!("{key} has no window_end the oracle can read: {fields:?}"));
        return Ok(check);
    };
    let end = Some(end);
    let Some(end) = check_end(&mut check, end, lowest, highest) else {
        return Ok(check);
    };
    let Some((_, want, _)) = windows.iter().find(|(s, _, _)| s + width == end) else {
        check.wrong(|| format!("holds window ending {end}, which has no events"));
        return Ok(check);
    };
    let number = |name: &str| fields.get(name).and_then(|v| v.parse::<f64>().ok());
    let got = Kpi {
        events: number("events").unwrap_or(-1.0) as i64,
        plays: number("plays").unwrap_or(-1.0) as i64,
        finishes: number("finishes").unwrap_or(-1.0) as i64,
        distinct_users: number("distinct_users").unwrap_or(-1.0) as i64,
        engagement_seconds: number("engagement_seconds").unwrap_or(f64::NAN),
        avg_engagement_seconds: number("avg_engagement_seconds"),
        avg_engagement_pct: number("avg_engagement_pct"),
        median_engagement_seconds: number("median_engagement_seconds"),
    };
    if fields.get("timeframe").map(String::as_str) != Some(timeframe) || !got.matches(want) {
        check.wrong(|| format!("{key} holds {got:?}, expected {want:?}"));
    }
    check.note = format!("window ending {end}; {}", check.note);
    Ok(check)
}

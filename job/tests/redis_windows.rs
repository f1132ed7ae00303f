//! The Redis sink's windowed writes (`write_window`) and its `sorted_set` and
//! hash targets, against a real Redis started for each test.
//!
//! These drive [`RedisSink`] directly with hand-built batches: what a windowed
//! query emits when a window closes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use engage::change::Position;
use engage::embedded::EmbeddedRedis;
use engage::sink::redis::RedisSink;
use engage::sql::options::{ListOperation, Redacted, RedisOptions, RedisTarget};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

/// A Redis server of one test.
struct Server {
    redis: EmbeddedRedis,
    /// Declared last: the server stops before its directory goes.
    _root: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let root = tempfile::Builder::new()
            .prefix("engage-redis-windows-")
            .tempdir()
            .unwrap();
        let redis = EmbeddedRedis::start(&root.path().join("redis"))
            .await
            .expect("redis starts");
        Server { redis, _root: root }
    }

    async fn connection(&self) -> MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    fn options(&self, target: RedisTarget, key_prefix: &str) -> RedisOptions {
        RedisOptions {
            address: Redacted::new(self.redis.url()),
            target,
            key_prefix: key_prefix.into(),
            key_column: None,
            field_column: None,
            value_column: None,
            member_column: None,
            score_column: None,
            ttl_secs: None,
            max_length: None,
            operation: ListOperation::Append,
            id_column: None,
        }
    }

    /// Options of a ranking: members from `content_id`, scored by `score`.
    fn ranking_options(&self, key_prefix: &str) -> RedisOptions {
        RedisOptions {
            member_column: Some("content_id".into()),
            score_column: Some("score".into()),
            ..self.options(RedisTarget::SortedSet, key_prefix)
        }
    }
}

async fn open(options: &RedisOptions, schema: &SchemaRef) -> RedisSink {
    RedisSink::open_for_schema("windows", "sink", options, schema, None)
        .await
        .unwrap()
}

fn schema(fields: &[(&str, DataType)]) -> SchemaRef {
    Arc::new(Schema::new(
        fields
            .iter()
            .map(|(name, data_type)| Field::new(*name, data_type.clone(), true))
            .collect::<Vec<_>>(),
    ))
}

fn ranking_schema() -> SchemaRef {
    schema(&[("content_id", DataType::Utf8), ("score", DataType::Float64)])
}

/// One batch of (member, score) rows.
fn ranking(rows: &[(Option<&str>, Option<f64>)]) -> RecordBatch {
    let members: StringArray = rows.iter().map(|(m, _)| *m).collect();
    let scores: Float64Array = rows.iter().map(|(_, s)| *s).collect();
    RecordBatch::try_new(
        ranking_schema(),
        vec![Arc::new(members) as ArrayRef, Arc::new(scores)],
    )
    .unwrap()
}

/// (device, content_id, score) rows, for targets keyed by device.
fn by_device(rows: &[(Option<&str>, Option<&str>, Option<i64>)]) -> RecordBatch {
    let devices: StringArray = rows.iter().map(|r| r.0).collect();
    let contents: StringArray = rows.iter().map(|r| r.1).collect();
    let scores: Int64Array = rows.iter().map(|r| r.2).collect();
    RecordBatch::try_new(
        by_device_schema(),
        vec![
            Arc::new(devices) as ArrayRef,
            Arc::new(contents),
            Arc::new(scores),
        ],
    )
    .unwrap()
}

fn by_device_schema() -> SchemaRef {
    schema(&[
        ("device", DataType::Utf8),
        ("content_id", DataType::Utf8),
        ("score", DataType::Int64),
    ])
}

fn at(lsn: u64) -> Position {
    Position::new(lsn, 0)
}

async fn members(redis: &mut MultiplexedConnection, key: &str) -> Vec<(String, f64)> {
    redis.zrange_withscores(key, 0, -1).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_set_window_replaces_the_previous_ranking_atomically() {
    let server = Server::start().await;
    let options = server.ranking_options("top:10m");
    let mut sink = open(&options, &ranking_schema()).await;
    // Window w ranks members `c<j>@w`, a window-specific number of them.
    let window = |w: i64| {
        let names: Vec<String> = (0..3 + w % 5).map(|j| format!("c{j}@{w}")).collect();
        let rows: Vec<(Option<&str>, Option<f64>)> = names
            .iter()
            .enumerate()
            .map(|(j, name)| (Some(name.as_str()), Some(j as f64)))
            .collect();
        ranking(&rows)
    };
    sink.write_window(vec![window(1)], 1_000, at(1))
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (first_read, first_read_done) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn({
        let stop = stop.clone();
        let mut redis = server.connection().await;
        async move {
            let mut first_read = Some(first_read);
            let mut seen = BTreeSet::new();
            loop {
                let last = stop.load(Ordering::SeqCst);
                let read: Vec<String> = redis.zrange("top:10m", 0, -1).await.unwrap();
                let windows: BTreeSet<&str> =
                    read.iter().map(|m| m.split_once('@').unwrap().1).collect();
                assert_eq!(windows.len(), 1, "a read mixed windows: {read:?}");
                let w: i64 = windows.first().unwrap().parse().unwrap();
                assert_eq!(read.len() as i64, 3 + w % 5, "a partial window: {read:?}");
                seen.insert(w);
                if let Some(first_read) = first_read.take() {
                    first_read.send(()).unwrap();
                }
                if last {
                    return seen;
                }
            }
        }
    });
    first_read_done.await.unwrap();
    for w in 2..=201 {
        sink.write_window(vec![window(w)], w * 1_000, at(w as u64))
            .await
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();
    assert!(seen.contains(&1) && seen.contains(&201), "{seen:?}");

    let mut redis = server.connection().await;
    let last: Vec<String> = redis.zrange("top:10m", 0, -1).await.unwrap();
    assert_eq!(
        last,
        (0..3 + 201 % 5)
            .map(|j| format!("c{j}@201"))
            .collect::<Vec<_>>(),
        "only the latest window's members, lowest score first"
    );
    assert_eq!(sink.window_end(), Some(201_000));
    assert_eq!(sink.position(), at(201));
    let position: String = redis.get("engage:job:windows:position:sink").await.unwrap();
    assert_eq!(position, at(201).to_sortable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_at_or_before_the_applied_end_is_skipped() {
    let server = Server::start().await;
    let options = server.ranking_options("top");
    let schema = ranking_schema();
    let mut first = open(&options, &schema).await;
    // A second sink opened before anything was written: its own record does not
    // know about the first's writes, so only the guard in Redis can stop it.
    let mut second = open(&options, &schema).await;
    assert_eq!(first.window_end(), None);

    first
        .write_window(vec![ranking(&[(Some("a"), Some(1.0))])], 2_000, at(5))
        .await
        .unwrap();
    second
        .write_window(vec![ranking(&[(Some("b"), Some(1.0))])], 2_000, at(9))
        .await
        .unwrap();
    second
        .write_window(vec![ranking(&[(Some("c"), Some(1.0))])], 1_000, at(9))
        .await
        .unwrap();
    first
        .write_window(vec![ranking(&[(Some("d"), Some(1.0))])], 1_500, at(9))
        .await
        .unwrap();

    let mut redis = server.connection().await;
    assert_eq!(members(&mut redis, "top").await, vec![("a".into(), 1.0)]);
    assert_eq!(second.window_end(), Some(2_000), "learnt from redis");
    assert_eq!(second.rows_written(), 0);
    assert_eq!(second.position(), Position::ZERO);
    let position: String = redis.get("engage:job:windows:position:sink").await.unwrap();
    assert_eq!(
        position,
        at(5).to_sortable(),
        "a skipped window moves nothing"
    );
    let ends: BTreeMap<String, String> = redis
        .hgetall("engage:job:windows:window_end")
        .await
        .unwrap();
    assert_eq!(ends, BTreeMap::from([("sink".into(), "2000".into())]));

    // After a restart the applied end is read back; a later window applies.
    drop(first);
    let mut restarted = open(&options, &schema).await;
    assert_eq!(restarted.window_end(), Some(2_000));
    restarted
        .write_window(vec![ranking(&[(Some("e"), Some(2.0))])], 2_500, at(3))
        .await
        .unwrap();
    assert_eq!(members(&mut redis, "top").await, vec![("e".into(), 2.0)]);
    let position: String = redis.get("engage:job:windows:position:sink").await.unwrap();
    assert_eq!(
        position,
        at(5).to_sortable(),
        "the position never moves back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_keeps_the_highest_scores() {
    let server = Server::start().await;
    let options = RedisOptions {
        max_length: Some(3),
        ttl_secs: Some(600),
        ..server.ranking_options("top")
    };
    let mut sink = open(&options, &ranking_schema()).await;
    let rows: Vec<(String, f64)> = (1..=6).map(|i| (format!("c{i}"), i as f64 * 1.5)).collect();
    let batch = |rows: &[(String, f64)]| {
        ranking(
            &rows
                .iter()
                .map(|(m, s)| (Some(m.as_str()), Some(*s)))
                .collect::<Vec<_>>(),
        )
    };
    // Two batches: trimming applies to the whole window, not per batch.
    sink.write_window(vec![batch(&rows[..4]), batch(&rows[4..])], 1_000, at(1))
        .await
        .unwrap();
    let mut redis = server.connection().await;
    assert_eq!(
        members(&mut redis, "top").await,
        vec![("c4".into(), 6.0), ("c5".into(), 7.5), ("c6".into(), 9.0)]
    );
    let ttl: i64 = redis.ttl("top").await.unwrap();
    assert!(ttl > 500 && ttl <= 600, "ttl {ttl}");
    assert_eq!(sink.rows_written(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_set_write_without_windows_sets_scores_and_trims() {
    let server = Server::start().await;
    let options = RedisOptions {
        key_column: Some("device".into()),
        max_length: Some(2),
        ..server.ranking_options("top:")
    };
    let mut sink = open(&options, &by_device_schema()).await;
    let ios = Some("ios");
    sink.write(
        vec![by_device(&[
            (ios, Some("a"), Some(1)),
            (ios, Some("b"), Some(2)),
        ])],
        at(1),
    )
    .await
    .unwrap();
    sink.write(
        vec![by_device(&[
            (ios, Some("a"), Some(5)),
            (ios, Some("c"), Some(3)),
        ])],
        at(2),
    )
    .await
    .unwrap();
    let mut redis = server.connection().await;
    assert_eq!(
        members(&mut redis, "top:ios").await,
        vec![("c".into(), 3.0), ("a".into(), 5.0)],
        "a row sets its member's score; the lowest beyond max_length go"
    );
    assert_eq!(sink.position(), at(2));
}

/// (content_id, id, _op) rows of a list that follows changes.
fn list_changes(rows: &[(&str, i64, &str)]) -> RecordBatch {
    let schema = schema(&[
        ("content_id", DataType::Utf8),
        ("id", DataType::Int64),
        ("_op", DataType::Utf8),
    ]);
    let contents: StringArray = rows.iter().map(|r| Some(r.0)).collect();
    let ids: Int64Array = rows.iter().map(|r| Some(r.1)).collect();
    let ops: StringArray = rows.iter().map(|r| Some(r.2)).collect();
    RecordBatch::try_new(
        schema,
        vec![Arc::new(contents) as ArrayRef, Arc::new(ids), Arc::new(ops)],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_with_an_id_column_removes_deleted_entries_in_stream_order() {
    let server = Server::start().await;
    let options = RedisOptions {
        key_column: Some("content_id".into()),
        max_length: Some(3),
        operation: ListOperation::Prepend,
        id_column: Some("id".into()),
        ..server.options(RedisTarget::List, "recent:")
    };
    let changes = list_changes(&[]).schema();
    assert_eq!(options.check_columns(&changes), Ok(()));
    let mut sink = open(&options, &changes).await;
    sink.write(
        vec![list_changes(&[("a", 1, "c"), ("a", 2, "c"), ("a", 3, "c")])],
        at(1),
    )
    .await
    .unwrap();
    // In one batch: 4 pushes 1 out, then 3 is deleted, then 5 comes: the list
    // reads as if each row came alone (1 does not come back).
    sink.write(
        vec![list_changes(&[
            ("a", 4, "c"),
            ("a", 3, "d"),
            ("a", 5, "c"),
            ("a", 99, "d"),
        ])],
        at(2),
    )
    .await
    .unwrap();
    let mut redis = server.connection().await;
    let entries: Vec<String> = redis.lrange("recent:a", 0, -1).await.unwrap();
    let ids: Vec<i64> = entries
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, vec![5, 4, 2]);
    assert!(!entries[0].contains("_op"), "{entries:?}");

    let without_op = schema(&[("content_id", DataType::Utf8), ("id", DataType::Int64)]);
    let error = options.check_columns(&without_op).unwrap_err();
    assert!(error.contains("must select `_op`"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_without_rows_in_the_new_window_are_deleted() {
    let server = Server::start().await;
    let options = RedisOptions {
        key_column: Some("device".into()),
        ..server.ranking_options("top:")
    };
    let mut sink = open(&options, &by_device_schema()).await;
    let (ios, web) = (Some("ios"), Some("web"));
    sink.write_window(
        vec![by_device(&[
            (ios, Some("a"), Some(1)),
            (web, Some("b"), Some(2)),
            (ios, Some("c"), Some(3)),
        ])],
        1_000,
        at(1),
    )
    .await
    .unwrap();
    let mut redis = server.connection().await;
    assert_eq!(
        members(&mut redis, "top:ios").await,
        vec![("a".into(), 1.0), ("c".into(), 3.0)]
    );
    assert_eq!(
        members(&mut redis, "top:web").await,
        vec![("b".into(), 2.0)]
    );

    sink.write_window(vec![by_device(&[(ios, Some("d"), Some(4))])], 2_000, at(2))
        .await
        .unwrap();
    assert_eq!(
        members(&mut redis, "top:ios").await,
        vec![("d".into(), 4.0)]
    );
    let web_exists: bool = redis.exists("top:web").await.unwrap();
    assert!(
        !web_exists,
        "a key of the previous window with no rows now is deleted"
    );
    let keys: BTreeSet<String> = redis
        .smembers("engage:job:windows:window_keys:sink")
        .await
        .unwrap();
    assert_eq!(keys, BTreeSet::from(["top:ios".to_string()]));

    sink.write_window(Vec::new(), 3_000, at(3)).await.unwrap();
    let left: Vec<String> = redis.keys("top:*").await.unwrap();
    assert!(left.is_empty(), "an empty window leaves no keys: {left:?}");
    assert_eq!(sink.window_end(), Some(3_000));
}

/// (timeframe, device, events, avg_pct)
type KpiRow<'a> = (&'a str, Option<&'a str>, Option<i64>, Option<f64>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_target_with_value_column_and_row_as_fields() {
    let server = Server::start().await;
    let schema = schema(&[
        ("timeframe", DataType::Utf8),
        ("device", DataType::Utf8),
        ("events", DataType::Int64),
        ("avg_pct", DataType::Float64),
    ]);
    let batch = |rows: &[KpiRow]| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(rows.iter().map(|r| Some(r.0)).collect::<StringArray>()) as ArrayRef,
                Arc::new(rows.iter().map(|r| r.1).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| r.2).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|r| r.3).collect::<Float64Array>()),
            ],
        )
        .unwrap()
    };
    let mut redis = server.connection().await;

    // A field per device, its value the `events` column's text.
    let by_device = RedisOptions {
        key_column: Some("timeframe".into()),
        field_column: Some("device".into()),
        value_column: Some("events".into()),
        ..server.options(RedisTarget::Hash, "engage:devices:")
    };
    let mut devices = RedisSink::open_for_schema("windows", "devices", &by_device, &schema, None)
        .await
        .unwrap();
    devices
        .write_window(
            vec![batch(&[
                ("10m", Some("ios"), Some(7), None),
                ("10m", Some("web"), Some(3), None),
                ("10m", Some("android"), None, None),
            ])],
            1_000,
            at(1),
        )
        .await
        .unwrap();
    let hash: BTreeMap<String, String> = redis.hgetall("engage:devices:10m").await.unwrap();
    assert_eq!(
        hash,
        BTreeMap::from([("ios".into(), "7".into()), ("web".into(), "3".into())])
    );
    assert_eq!(
        devices.null_values(),
        1,
        "a NULL value is counted, not written"
    );

    // A row as a hash: every column a field, NULL columns omitted.
    let kpi = RedisOptions {
        key_column: Some("timeframe".into()),
        ..server.options(RedisTarget::Hash, "engage:kpi:")
    };
    let mut kpis = RedisSink::open_for_schema("windows", "kpi", &kpi, &schema, None)
        .await
        .unwrap();
    kpis.write_window(
        vec![batch(&[("10m", Some("all"), Some(10), Some(42.5))])],
        1_000,
        at(1),
    )
    .await
    .unwrap();
    let hash: BTreeMap<String, String> = redis.hgetall("engage:kpi:10m").await.unwrap();
    assert_eq!(
        hash,
        BTreeMap::from([
            ("timeframe".into(), "10m".into()),
            ("device".into(), "all".into()),
            ("events".into(), "10".into()),
            ("avg_pct".into(), "42.5".into()),
        ])
    );
    kpis.write_window(vec![batch(&[("10m", None, Some(12), None)])], 2_000, at(2))
        .await
        .unwrap();
    let hash: BTreeMap<String, String> = redis.hgetall("engage:kpi:10m").await.unwrap();
    assert_eq!(
        hash,
        BTreeMap::from([
            ("timeframe".into(), "10m".into()),
            ("events".into(), "12".into()),
        ]),
        "the window replaces the hash: fields NULL now are gone"
    );

    // Without windows, the same rows update the hash field by field.
    let mut kpis = RedisSink::open_for_schema("windows", "kpi_stream", &kpi, &schema, None)
        .await
        .unwrap();
    kpis.write(
        vec![batch(&[("1h", Some("ios"), Some(1), Some(1.0))])],
        at(1),
    )
    .await
    .unwrap();
    kpis.write(vec![batch(&[("1h", None, Some(2), None)])], at(2))
        .await
        .unwrap();
    let hash: BTreeMap<String, String> = redis.hgetall("engage:kpi:1h").await.unwrap();
    assert_eq!(
        hash,
        BTreeMap::from([
            ("timeframe".into(), "1h".into()),
            ("device".into(), "ios".into()),
            ("events".into(), "2".into()),
            ("avg_pct".into(), "1.0".into()),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_member_or_score_is_counted_not_written() {
    let server = Server::start().await;
    let options = RedisOptions {
        key_column: Some("device".into()),
        ..server.ranking_options("top:")
    };
    let schema = schema(&[
        ("device", DataType::Utf8),
        ("content_id", DataType::Utf8),
        ("score", DataType::Float64),
    ]);
    let rows: [(Option<&str>, Option<&str>, Option<f64>); 6] = [
        (Some("ios"), Some("a"), Some(1.0)),
        (Some("ios"), None, Some(2.0)),
        (Some("ios"), Some("b"), None),
        (Some("ios"), Some("c"), Some(f64::NAN)),
        (None, Some("d"), Some(4.0)),
        (Some("web"), Some("e"), Some(f64::INFINITY)),
    ];
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(rows.iter().map(|r| r.0).collect::<StringArray>()) as ArrayRef,
            Arc::new(rows.iter().map(|r| r.1).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.2).collect::<Float64Array>()),
        ],
    )
    .unwrap();
    let mut sink = open(&options, &schema).await;
    sink.write_window(vec![batch.clone()], 1_000, at(1))
        .await
        .unwrap();
    assert_eq!(sink.null_values(), 3, "NULL member, NULL score, NaN score");
    assert_eq!(sink.null_keys(), 1);
    assert_eq!(sink.rows_written(), 2);
    let mut redis = server.connection().await;
    assert_eq!(
        members(&mut redis, "top:ios").await,
        vec![("a".into(), 1.0)]
    );
    assert_eq!(
        members(&mut redis, "top:web").await,
        vec![("e".into(), f64::INFINITY)]
    );
    let keys: BTreeSet<String> = redis.keys("top:*").await.unwrap();
    assert_eq!(keys, BTreeSet::from(["top:ios".into(), "top:web".into()]));

    // The same rows without windows.
    let mut stream = RedisSink::open_for_schema("windows", "stream", &options, &schema, None)
        .await
        .unwrap();
    stream.write(vec![batch], at(1)).await.unwrap();
    assert_eq!((stream.null_values(), stream.null_keys()), (3, 1));
    assert_eq!(stream.rows_written(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_string_windows_hold_only_the_latest_window() {
    let server = Server::start().await;
    let mut redis = server.connection().await;
    let list = RedisOptions {
        key_column: Some("device".into()),
        max_length: Some(2),
        operation: ListOperation::Prepend,
        ..server.options(RedisTarget::List, "recent:")
    };
    let string = RedisOptions {
        key_column: Some("device".into()),
        ..server.options(RedisTarget::String, "last:")
    };
    let schema = by_device_schema();
    let mut lists = RedisSink::open_for_schema("windows", "lists", &list, &schema, None)
        .await
        .unwrap();
    let mut strings = RedisSink::open_for_schema("windows", "strings", &string, &schema, None)
        .await
        .unwrap();
    let ios = Some("ios");
    let first = by_device(&[
        (ios, Some("a"), Some(1)),
        (ios, Some("b"), Some(2)),
        (ios, Some("c"), Some(3)),
    ]);
    let second = by_device(&[(ios, Some("d"), Some(4))]);
    for (batch, end) in [(first, 1_000), (second, 2_000)] {
        lists
            .write_window(vec![batch.clone()], end, at(1))
            .await
            .unwrap();
        strings.write_window(vec![batch], end, at(1)).await.unwrap();
        let content_ids = |values: Vec<String>| -> Vec<String> {
            values
                .iter()
                .map(|v| {
                    serde_json::from_str::<serde_json::Value>(v).unwrap()["content_id"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        let listed: Vec<String> = redis.lrange("recent:ios", 0, -1).await.unwrap();
        let last: String = redis.get("last:ios").await.unwrap();
        if end == 1_000 {
            assert_eq!(content_ids(listed), ["c", "b"], "newest first, trimmed");
            assert_eq!(content_ids(vec![last]), ["c"], "the last row wins");
        } else {
            assert_eq!(content_ids(listed), ["d"], "only the latest window");
            assert_eq!(content_ids(vec![last]), ["d"]);
        }
    }
}

#[test]
fn column_checks_name_the_output_columns_and_want_a_numeric_score() {
    let options = RedisOptions {
        address: Redacted::new("redis://127.0.0.1:6379"),
        target: RedisTarget::SortedSet,
        key_prefix: "top".into(),
        key_column: None,
        field_column: None,
        value_column: None,
        member_column: Some("content_id".into()),
        score_column: Some("score".into()),
        ttl_secs: None,
        max_length: None,
        operation: ListOperation::Append,
        id_column: None,
    };
    assert_eq!(options.check_columns(&ranking_schema()), Ok(()));
    assert_eq!(options.check_columns(&by_device_schema()), Ok(()));

    let text_score = schema(&[("content_id", DataType::Utf8), ("score", DataType::Utf8)]);
    let error = options.check_columns(&text_score).unwrap_err();
    assert!(
        error.contains("`target.score_column` names `score`"),
        "{error}"
    );
    assert!(error.contains("numeric"), "{error}");

    let missing = RedisOptions {
        member_column: Some("content".into()),
        ..options.clone()
    };
    let error = missing.check_columns(&ranking_schema()).unwrap_err();
    assert!(
        error.contains("`target.member_column` names `content`, which is not an output column"),
        "{error}"
    );
    assert!(
        error.contains("output columns: content_id, score"),
        "{error}"
    );

    let value = RedisOptions {
        target: RedisTarget::Hash,
        field_column: Some("content_id".into()),
        value_column: Some("events".into()),
        member_column: None,
        score_column: None,
        ..options
    };
    let error = value.check_columns(&ranking_schema()).unwrap_err();
    assert!(
        error.contains("`target.value_column` names `events`"),
        "{error}"
    );
}

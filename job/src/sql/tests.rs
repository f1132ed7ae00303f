//! Tests of job SQL parsing and planning (no IO).

use super::*;
use arrow::datatypes::{IntervalUnit, TimeUnit};

fn env(name: &str) -> Option<String> {
    match name {
        "ENGAGE_POSTGRES_URL" => Some("postgres://engage:secret@127.0.0.1:5432/app".into()),
        "ENGAGE_REDIS_URL" => Some("redis://127.0.0.1:6379".into()),
        "ENGAGE_KAFKA_BROKERS" => Some("127.0.0.1:9092".into()),
        _ => None,
    }
}

const MISSION: &str = include_str!("../../../sql/engagement.sql");

/// [`super::parse_job`] with the UDFs the SQL calls loaded (the crates
/// shipped in udfs/, built once into the cache).
fn parse_job(
    job_name: &str,
    script: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<JobSpec, SqlError> {
    let mut spec = super::parse_job(job_name, script, env)?;
    spec.udfs = crate::udf::prepare(script, &crate::udf::UdfOptions::default())
        .expect("the shipped UDFs build and load");
    Ok(spec)
}

#[test]
fn mission_pipeline_parses_with_watermark_key_and_options() {
    let spec = parse_job("engagement", MISSION, &env).unwrap();
    assert_eq!(spec.tables.len(), 16);
    let events = &spec.tables[0];
    assert_eq!(events.name, "engagement_events");
    assert_eq!(events.primary_key, vec!["id"]);
    let watermark = events.watermark.as_ref().unwrap();
    assert_eq!(watermark.column, "event_ts");
    assert_eq!(
        watermark.expression,
        "event_ts - INTERVAL '200 milliseconds'"
    );
    let Some(fs) = spec.tables[2].connector.filesystem() else {
        panic!("filesystem expected")
    };
    assert_eq!(fs.path, "./data/enriched_events");
    assert_eq!(fs.time_pattern.as_deref(), Some("event_date=%Y-%m-%d"));
    let Some(redis) = spec.tables[3].connector.redis() else {
        panic!("redis expected")
    };
    assert_eq!(redis.max_length, Some(50));
    assert_eq!(spec.inserts.len(), 12);
}

#[test]
fn connection_passwords_never_show_in_debug_output() {
    let spec = parse_job("engagement", MISSION, &env).unwrap();
    let debug = format!("{spec:?}");
    assert!(!debug.contains("secret"), "{debug}");
    assert!(debug.contains("engage:***@127.0.0.1"), "{debug}");
}

#[test]
fn missing_environment_variable_is_named() {
    let error = parse_job("engagement", MISSION, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`ENGAGE_POSTGRES_URL` is not set"),
        "{error}"
    );
}

#[test]
fn unknown_connector_lists_the_valid_ones() {
    let sql = "CREATE TABLE t WITH (connector = 'kafkaa', topic = 'x');";
    let error = parse_job("j", sql, &env).unwrap_err().to_string();
    assert!(error.contains("unknown connector `kafkaa`"), "{error}");
    assert!(error.contains("postgres-cdc, filesystem, redis"), "{error}");
}

#[test]
fn unknown_option_lists_the_valid_ones() {
    let sql = "CREATE TABLE t WITH (connector = 'filesystem', path = '/tmp/x', colour = 'red');";
    let error = parse_job("j", sql, &env).unwrap_err().to_string();
    assert!(error.contains("unknown option `colour`"), "{error}");
    assert!(error.contains("partitioning.time_pattern"), "{error}");
}

#[test]
fn replica_identity_autoset_takes_full_only() {
    let table = |value: &str| {
        format!(
            "CREATE TABLE e (id BIGINT, PRIMARY KEY (id)) WITH (connector = 'postgres-cdc', \
             connection = '${{ENGAGE_POSTGRES_URL}}', table = 'public.e', 'replica_identity.autoset' = '{value}');
             CREATE TABLE out WITH (connector = 'filesystem', path = '/tmp/out', format = 'parquet');
             INSERT INTO out SELECT id FROM e;"
        )
    };
    let spec = parse_job("j", &table("full"), &env).unwrap();
    let connector = &spec.tables[0].connector;
    match connector.postgres_cdc() {
        Some(options) => assert!(options.autoset_full_identity),
        None => panic!("{connector:?}"),
    }
    let error = parse_job("j", &table("index"), &env)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("option `replica_identity.autoset` must be `full`, got `index`"),
        "{error}"
    );
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let sql = "CREATE TABLE t (\n  id BIGINT,\n  name BLOB\n) WITH (connector = 'postgres-cdc');";
    let error = parse_job("j", sql, &env).unwrap_err().to_string();
    assert!(
        error.starts_with("syntax error at line 3, column 8"),
        "{error}"
    );
    assert!(error.contains("unsupported type `BLOB`"), "{error}");
}

#[test]
fn statements_other_than_the_dialect_are_refused() {
    let error = parse_job("j", "\n\nDROP TABLE x;", &env)
        .unwrap_err()
        .to_string();
    assert!(error.contains("line 3, column 1"), "{error}");
    assert!(
        error.contains("expected CREATE TABLE, CREATE VIEW or INSERT INTO"),
        "{error}"
    );
}

#[test]
fn substitution_replaces_every_variable() {
    let out = substitute_env("${A}/x/${B}", &|k| Some(k.to_lowercase())).unwrap();
    assert_eq!(out, "a/x/b");
    assert_eq!(
        substitute_env("${ENGAGE_DATA_DIR}/t", &|_| None).unwrap(),
        "./data/t"
    );
    assert_eq!(substitute_env("${NOPE}", &|_| None).unwrap_err(), "NOPE");
}

#[tokio::test]
async fn mission_plan_drives_by_events_and_looks_up_content() {
    let spec = parse_job("engagement", MISSION, &env).unwrap();
    let plan = plan::JobPlan::new(&spec).await.unwrap();
    assert_eq!(plan.sources.len(), 2);
    let windowed: Vec<usize> = plan.queries.iter().map(|q| q.windows.len()).collect();
    assert_eq!(windowed, vec![0, 0, 1, 1, 1, 1, 4, 1, 1, 1, 1, 0]);
    // `enriched` is computed once per batch and shared: the join with
    // `content` (a dimension) lives in the view, and every query reads it.
    assert_eq!(plan.views.len(), 1);
    assert_eq!(plan.views[0].name, "enriched");
    assert_eq!(plan.views[0].dimensions, vec![1]);
    for query in &plan.queries {
        assert_eq!(plan.sources[query.driving].def.name, "engagement_events");
        assert_eq!(query.view, Some(0));
    }
    assert!(plan.sources[1].is_dimension);
    let warehouse = &plan.queries[0];
    let names: Vec<_> = warehouse
        .output_schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    for column in [
        "id",
        "content_type",
        "engagement_seconds",
        "engagement_pct",
        "_op",
        "_lsn",
    ] {
        assert!(
            names.contains(&column.to_string()),
            "{column} missing from {names:?}"
        );
    }
    assert!(warehouse.time_column.is_some());
    // Each KPI window goes to Parquet (`kpi`, 4 windows) and to its own Redis
    // hash: the two keep the same state, which the engine keeps once.
    let kpi = &plan.queries[6];
    for (i, latest) in plan.queries[7..11].iter().enumerate() {
        assert!(kpi.windows[i].same_state_as(&latest.windows[0]));
        assert!(!kpi.windows[(i + 1) % 4].same_state_as(&latest.windows[0]));
    }
    // The four 10-minute rankings group differently: no sharing.
    assert!(!plan.queries[2].windows[0].same_state_as(&plan.queries[3].windows[0]));
    assert!(!plan.queries[3].windows[0].same_state_as(&plan.queries[4].windows[0]));
    assert!(!plan.queries[4].windows[0].same_state_as(&plan.queries[5].windows[0]));
}

#[tokio::test]
async fn sql_errors_in_queries_point_at_the_script_line() {
    let sql = MISSION.replace(
        "e.device,\n       c.content_type",
        "e.devise,\n       c.content_type",
    );
    let spec = parse_job("engagement", &sql, &env).unwrap();
    let error = plan::JobPlan::new(&spec).await.unwrap_err().to_string();
    assert!(error.contains("view `enriched`"), "{error}");
    assert!(error.contains("devise"), "{error}");
}

#[tokio::test]
async fn unwindowed_aggregation_is_refused_at_plan_time() {
    let sql = MISSION.replace(
        "INSERT INTO enriched_events SELECT * FROM enriched;",
        "INSERT INTO enriched_events SELECT content_id, count(*) AS n FROM enriched GROUP BY content_id;",
    );
    let spec = parse_job("engagement", &sql, &env).unwrap();
    let error = plan::JobPlan::new(&spec).await.unwrap_err().to_string();
    assert!(error.contains("GROUP BY"), "{error}");
    assert!(error.contains("window"), "{error}");
}

#[tokio::test]
async fn dimension_without_primary_key_is_refused() {
    let sql = MISSION.replace(",\n    PRIMARY KEY (id)\n) WITH (\n    connector  = 'postgres-cdc',\n    connection = '${ENGAGE_POSTGRES_URL}',\n    table      = 'public.content'", "\n) WITH (\n    connector  = 'postgres-cdc',\n    connection = '${ENGAGE_POSTGRES_URL}',\n    table      = 'public.content'");
    assert_ne!(sql, MISSION, "test edit must apply");
    let spec = parse_job("engagement", &sql, &env).unwrap();
    let error = plan::JobPlan::new(&spec).await.unwrap_err().to_string();
    assert!(error.contains("needs a PRIMARY KEY"), "{error}");
}

/// The options of a redis sink declared with `options` (`key = 'value'`
/// pairs, comma-separated), or the error.
fn redis_sink(options: &str) -> Result<RedisOptions, String> {
    let mut map: HashMap<String, String> = options
        .split(',')
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("key = value");
            let unquote = |s: &str| s.trim().trim_matches('\'').to_string();
            (unquote(key), unquote(value))
        })
        .collect();
    map.insert("connector".into(), "redis".into());
    map.insert("address".into(), "redis://127.0.0.1:6379".into());
    match Connector::from_options("t", &[], map)? {
        Connector::Sink(SinkConnector::Redis(options)) => Ok(options),
        other => panic!("redis expected, got {other:?}"),
    }
}

#[test]
fn sorted_set_target_takes_member_score_and_max_length() {
    let options = redis_sink(
        "target = 'sorted_set', 'target.key_prefix' = 'engage:top_content:10m', \
         'target.member_column' = 'content_id', 'target.score_column' = 'score', \
         'target.max_length' = '100', 'target.ttl_secs' = '900'",
    )
    .unwrap();
    assert_eq!(options.target, RedisTarget::SortedSet);
    assert_eq!(options.key_column, None);
    assert_eq!(options.member_column.as_deref(), Some("content_id"));
    assert_eq!(options.score_column.as_deref(), Some("score"));
    assert_eq!(options.max_length, Some(100));
    assert_eq!(options.ttl_secs, Some(900));
}

#[test]
fn sorted_set_target_needs_member_and_score_columns() {
    let error = redis_sink(
        "target = 'sorted_set', 'target.key_prefix' = 'top', 'target.score_column' = 'score'",
    )
    .unwrap_err();
    assert!(
        error.contains("redis target `sorted_set` needs option `target.member_column`"),
        "{error}"
    );
    let error = redis_sink(
        "target = 'sorted_set', 'target.key_prefix' = 'top', 'target.member_column' = 'id'",
    )
    .unwrap_err();
    assert!(
        error.contains("needs option `target.score_column`"),
        "{error}"
    );
}

#[test]
fn member_and_score_columns_only_apply_to_sorted_set() {
    for option in ["target.member_column", "target.score_column"] {
        let error = redis_sink(&format!(
            "target = 'list', 'target.key_prefix' = 'l:', '{option}' = 'x'"
        ))
        .unwrap_err();
        assert!(
            error.contains(&format!(
                "option `{option}` only applies to target `sorted_set`"
            )),
            "{error}"
        );
    }
}

#[test]
fn max_length_applies_to_list_and_sorted_set_only() {
    let error =
        redis_sink("target = 'hash', 'target.key_prefix' = 'h:', 'target.max_length' = '5'")
            .unwrap_err();
    assert!(
        error
            .contains("option `target.max_length` only applies to targets `list` and `sorted_set`"),
        "{error}"
    );
    let error = redis_sink(
        "target = 'sorted_set', 'target.key_prefix' = 'top', 'target.member_column' = 'id', \
         'target.score_column' = 'n', 'target.operation' = 'prepend'",
    )
    .unwrap_err();
    assert!(
        error.contains("option `target.operation` only applies to target `list`"),
        "{error}"
    );
    let list = redis_sink("target = 'list', 'target.key_prefix' = 'l:', 'target.max_length' = '5'");
    assert_eq!(list.unwrap().max_length, Some(5));
}

#[test]
fn hash_target_takes_a_value_column_or_writes_rows_as_fields() {
    let row = redis_sink(
        "target = 'hash', 'target.key_prefix' = 'engage:kpi:', 'target.key_column' = 'timeframe'",
    )
    .unwrap();
    assert_eq!((row.field_column, row.value_column), (None, None));
    let valued = redis_sink(
        "target = 'hash', 'target.key_prefix' = 'd:', 'target.field_column' = 'device', \
         'target.value_column' = 'events'",
    )
    .unwrap();
    assert_eq!(valued.value_column.as_deref(), Some("events"));

    let error =
        redis_sink("target = 'hash', 'target.key_prefix' = 'd:', 'target.value_column' = 'events'")
            .unwrap_err();
    assert!(
        error.contains("option `target.value_column` needs `target.field_column`"),
        "{error}"
    );
    let error = redis_sink(
        "target = 'string', 'target.key_prefix' = 's:', 'target.value_column' = 'events'",
    )
    .unwrap_err();
    assert!(
        error.contains("option `target.value_column` only applies to target `hash`"),
        "{error}"
    );
}

#[test]
fn unknown_redis_option_lists_the_new_ones() {
    let error =
        redis_sink("target = 'sorted_set', 'target.key_prefix' = 'top', 'target.rank' = 'x'")
            .unwrap_err();
    assert!(error.contains("unknown option `target.rank`"), "{error}");
    for option in [
        "target.member_column",
        "target.score_column",
        "target.value_column",
    ] {
        assert!(error.contains(option), "{option} missing from: {error}");
    }
    let error = redis_sink("target = 'set', 'target.key_prefix' = 'top'").unwrap_err();
    assert!(error.contains("string, list, hash, sorted_set"), "{error}");
}

#[test]
fn check_constraints_keep_their_names_and_expressions() {
    let spec = parse_job("engagement", MISSION, &env).unwrap();
    let checks = &spec.tables[0].checks;
    let names: Vec<_> = checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "content_missing",
            "unknown_event_type",
            "bad_duration",
            "payload_not_object",
            "payload_too_large",
            "unknown_content"
        ]
    );
    assert_eq!(
        checks[5].expression.trim(),
        "content_id IN (SELECT id FROM content)"
    );
    let sql = "CREATE TABLE t (id BIGINT, CHECK (id > 0)) WITH (connector = 'filesystem', path = '/tmp/x');";
    let error = parse_job("j", sql, &env).unwrap_err().to_string();
    assert!(
        error.contains("CHECK constraints apply to postgres-cdc source tables only"),
        "{error}"
    );
}

fn declared_types(columns: &str) -> Result<Vec<DataType>, String> {
    let sql = format!(
        "CREATE TABLE t ({columns}) WITH (connector = 'postgres-cdc', \
         connection = '${{ENGAGE_POSTGRES_URL}}', table = 'public.t');
         CREATE TABLE o WITH (connector = 'filesystem', path = '/tmp/o', format = 'parquet');
         INSERT INTO o SELECT * FROM t;"
    );
    let spec = parse_job("j", &sql, &env).map_err(|e| e.to_string())?;
    Ok(spec.tables[0]
        .columns
        .iter()
        .map(|f| f.data_type().clone())
        .collect())
}

#[test]
fn decimals_times_intervals_bytes_and_arrays_are_declared_types() {
    let list = |item: DataType| DataType::List(Arc::new(Field::new("item", item, true)));
    let types = declared_types(
        "a NUMERIC(12, 2), b DECIMAL(38), c NUMERIC, d TIME, e INTERVAL, f BYTEA, \
         g TEXT[], h BIGINT ARRAY, i INT[3], j NUMERIC(10,4)[], k VARCHAR(20), l TIMESTAMP(3)",
    )
    .unwrap();
    assert_eq!(
        types,
        vec![
            DataType::Decimal128(12, 2),
            DataType::Decimal128(38, 0),
            DataType::Decimal128(38, UNCONSTRAINED_NUMERIC_SCALE),
            DataType::Time64(TimeUnit::Microsecond),
            DataType::Interval(IntervalUnit::MonthDayNano),
            DataType::Binary,
            list(DataType::Utf8),
            list(DataType::Int64),
            list(DataType::Int32),
            list(DataType::Decimal128(10, 4)),
            DataType::Utf8,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ]
    );
}

#[test]
fn declared_types_out_of_range_say_what_is_wrong() {
    for (columns, expected) in [
        ("a NUMERIC(39, 2)", "precision of 1 to 38"),
        ("a DECIMAL(5, 6)", "scale from 0 to the precision"),
        ("a NUMERIC(1, 2, 3)", "takes (precision[, scale])"),
        ("a TEXT[][]", "multi-dimensional arrays are not supported"),
        ("a TIMETZ", "supported: BIGINT"),
        ("a TEXT[", "unclosed `[`"),
    ] {
        let error = declared_types(columns).unwrap_err();
        assert!(error.contains(expected), "{columns}: {error}");
    }
}

#[tokio::test]
async fn window_min_max_of_wide_decimals_is_refused_but_their_sums_plan() {
    let job = |aggregate: &str| {
        format!(
            "CREATE TABLE sales (id BIGINT, amount NUMERIC(20, 2), at TIMESTAMP, PRIMARY KEY (id),
                 WATERMARK FOR at AS at - INTERVAL '1 second')
             WITH (connector = 'postgres-cdc', connection = '${{ENGAGE_POSTGRES_URL}}', table = 'public.sales');
             CREATE TABLE o WITH (connector = 'filesystem', path = '/tmp/o', format = 'parquet');
             INSERT INTO o SELECT window.start AS s, v FROM (
                 SELECT tumble(INTERVAL '1 minute') AS window, {aggregate} AS v FROM sales GROUP BY window
             );"
        )
    };
    let spec = parse_job("j", &job("max(amount)"), &env).unwrap();
    let error = plan::JobPlan::new(&spec).await.unwrap_err().to_string();
    assert!(
        error.contains("DECIMAL(20, 2)") && error.contains("CAST"),
        "{error}"
    );
    let spec = parse_job("j", &job("sum(amount)"), &env).unwrap();
    plan::JobPlan::new(&spec).await.unwrap();
}

#[tokio::test]
async fn a_blackhole_sink_plans_and_refuses_options_it_does_not_have() {
    let redis = "CREATE TABLE recent_events WITH (\n    connector = 'redis',";
    assert!(MISSION.contains(redis), "test edit must apply");
    let start = MISSION.find(redis).unwrap();
    let end = start + MISSION[start..].find(");").unwrap() + 2;
    let sql = format!(
        "{}CREATE TABLE recent_events WITH (connector = 'blackhole');{}",
        &MISSION[..start],
        &MISSION[end..]
    );
    let spec = parse_job("engagement", &sql, &env).unwrap();
    let table = spec
        .tables
        .iter()
        .find(|t| t.name == "recent_events")
        .unwrap();
    assert!(matches!(
        table.connector.as_sink(),
        Some(SinkConnector::Blackhole)
    ));
    plan::JobPlan::new(&spec).await.unwrap();

    let sql = sql.replace(
        "WITH (connector = 'blackhole')",
        "WITH (connector = 'blackhole', path = '/tmp/x')",
    );
    let error = parse_job("engagement", &sql, &env).unwrap_err().to_string();
    assert!(
        error.contains("unknown option `path` for connector `blackhole`; valid options: type"),
        "{error}"
    );
}

/// The mission SQL with its Kafka sink's options replaced by `options`.
fn mission_with_kafka(options: &str) -> String {
    let head = "CREATE TABLE enriched_events_topic WITH (";
    let start = MISSION.find(head).expect("the mission has a kafka sink");
    let end = start + MISSION[start..].find(");").unwrap() + 2;
    format!("{}{head}{options});{}", &MISSION[..start], &MISSION[end..])
}

#[tokio::test]
async fn the_mission_kafka_sink_is_keyed_by_content_with_its_timestamp_from_the_watermark() {
    let spec = parse_job("engagement", MISSION, &env).unwrap();
    let table = spec
        .tables
        .iter()
        .find(|t| t.name == "enriched_events_topic")
        .unwrap();
    let Some(SinkConnector::Kafka(kafka)) = table.connector.as_sink() else {
        panic!("a kafka sink expected");
    };
    assert_eq!(kafka.topic, "engage.enriched_events");
    assert_eq!(kafka.bootstrap_servers, "127.0.0.1:9092");
    assert_eq!(kafka.key_field.as_deref(), Some("content_id"));
    assert_eq!(kafka.commit_mode, CommitMode::ExactlyOnce);
    assert_eq!(kafka.format, KafkaFormat::Json);
    let plan = plan::JobPlan::new(&spec).await.unwrap();
    let query = plan
        .queries
        .iter()
        .find(|q| plan.sinks[q.sink].def.name == "enriched_events_topic")
        .unwrap();
    let timestamp = query
        .time_column
        .expect("event_ts is the message timestamp");
    assert_eq!(query.output_schema.field(timestamp).name(), "event_ts");
}

#[tokio::test]
async fn kafka_options_are_checked_and_errors_say_what_to_do() {
    let base = "connector = 'kafka', bootstrap_servers = 'b:9092', topic = 't', type = 'sink'";
    let error_of = |options: &str| {
        parse_job("engagement", &mission_with_kafka(options), &env)
            .unwrap_err()
            .to_string()
    };
    let error = error_of(&format!("{base}, 'sink.colour' = 'red'"));
    assert!(error.contains("unknown option `sink.colour`"), "{error}");
    assert!(
        error.contains("sink.commit_mode") && error.contains("kafka.<librdkafka setting>"),
        "{error}"
    );
    let error = error_of(&format!("{base}, 'kafka.enable.idempotence' = 'false'"));
    assert!(
        error.contains("engage sets `enable.idempotence` itself"),
        "{error}"
    );
    let error = error_of(&format!("{base}, 'sink.commit_mode' = 'twice'"));
    assert!(error.contains("exactly_once, at_least_once"), "{error}");
    let error = error_of("connector = 'kafka', bootstrap_servers = 'b:9092', topic = 't'");
    assert!(error.contains("needs option `type`"), "{error}");
    let error = error_of(
        "connector = 'kafka', bootstrap_servers = 'b:9092', topic = 'a topic', type = 'sink'",
    );
    assert!(error.contains("option `topic` must be"), "{error}");
    let error =
        error_of("connector = 'kafka', bootstrap_servers = 'b:9092', topic = 't', type = 'source'");
    assert!(error.contains("not supported yet"), "{error}");

    // Client settings pass through; their values never reach Debug output.
    let sql = mission_with_kafka(&format!(
        "{base}, 'kafka.sasl.password' = 'hunter2', 'kafka.compression.type' = 'zstd'"
    ));
    let spec = parse_job("engagement", &sql, &env).unwrap();
    let debug = format!("{:?}", spec.tables);
    assert!(
        debug.contains("sasl.password") && !debug.contains("hunter2"),
        "{debug}"
    );

    // Planning checks the columns against the query.
    let plan_error = |options: &str, insert: &str| {
        let sql = mission_with_kafka(options).replace(
            "INSERT INTO enriched_events_topic SELECT * FROM enriched;",
            insert,
        );
        async move {
            let spec = parse_job("engagement", &sql, &env).unwrap();
            plan::JobPlan::new(&spec).await.unwrap_err().to_string()
        }
    };
    let error = plan_error(
        base,
        "INSERT INTO enriched_events_topic SELECT id, content_id FROM enriched;",
    )
    .await;
    assert!(error.contains("needs `_lsn` and `_seq`"), "{error}");
    let error = plan_error(
        &format!("{base}, 'sink.key_field' = 'nope'"),
        "INSERT INTO enriched_events_topic SELECT * FROM enriched;",
    )
    .await;
    assert!(error.contains("`sink.key_field` names `nope`"), "{error}");
    let error = plan_error(
        base,
        "INSERT INTO enriched_events_topic SELECT device, count(*) AS n, 0 AS _lsn, 0 AS _seq \
         FROM enriched GROUP BY device, tumble(INTERVAL '1 minute');",
    )
    .await;
    assert!(error.contains("windowed query"), "{error}");
}

/// A batch of `schema` with `rows` rows: each column by name from `values`
/// (text, bigint), metadata columns from the row index (position order).
fn batch_of(
    schema: &arrow::datatypes::SchemaRef,
    rows: usize,
    values: &dyn Fn(&str, usize) -> Option<String>,
) -> arrow::record_batch::RecordBatch {
    use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|field| -> ArrayRef {
            match (field.name().as_str(), field.data_type()) {
                ("_op", _) => std::sync::Arc::new(StringArray::from(vec!["c"; rows])),
                ("_lsn", _) => std::sync::Arc::new(Int64Array::from_iter_values(
                    (0..rows as i64).map(|i| 1000 + i),
                )),
                ("_seq", _) => std::sync::Arc::new(Int64Array::from(vec![0i64; rows])),
                ("_commit_ts", _) => std::sync::Arc::new(
                    TimestampMicrosecondArray::from(vec![0i64; rows]).with_timezone("UTC"),
                ),
                (name, DataType::Int64) => std::sync::Arc::new(Int64Array::from_iter(
                    (0..rows).map(|i| values(name, i).map(|v| v.parse::<i64>().unwrap())),
                )),
                (name, _) => {
                    std::sync::Arc::new(StringArray::from_iter((0..rows).map(|i| values(name, i))))
                }
            }
        })
        .collect();
    arrow::record_batch::RecordBatch::try_new(schema.clone(), columns).unwrap()
}

/// A job whose one query is `events LEFT JOIN content` (a dimension, no
/// view), with the indexes of its two sources.
async fn events_left_join_content() -> (plan::JobPlan, usize, usize) {
    let sql = "
        CREATE TABLE events (id BIGINT, cid TEXT, PRIMARY KEY (id)) WITH (connector = 'postgres-cdc',
            connection = 'postgres://u@127.0.0.1/db', table = 'public.events');
        CREATE TABLE content (id TEXT, title TEXT, PRIMARY KEY (id)) WITH (connector = 'postgres-cdc',
            connection = 'postgres://u@127.0.0.1/db', table = 'public.content');
        CREATE TABLE out WITH (connector = 'blackhole');
        INSERT INTO out SELECT e.id, c.title FROM events e LEFT JOIN content c ON e.cid = c.id;";
    let spec = parse_job("j", sql, &|_| None).unwrap();
    let plan = plan::JobPlan::new(&spec).await.unwrap();
    let source = |name: &str| {
        plan.sources
            .iter()
            .position(|s| s.def.name == name)
            .unwrap()
    };
    let (events, content) = (source("events"), source("content"));
    (plan, events, content)
}

/// Physical plans are made once and reused for every batch: each run sees
/// its own input and the dimension as it stands at that run, not the hash
/// join's build side of the run before.
#[tokio::test]
async fn a_reused_plan_sees_each_batch_and_the_dimension_as_it_stands() {
    let (plan, events, content) = events_left_join_content().await;
    let titles = |output: &[arrow::record_batch::RecordBatch]| -> Vec<Option<String>> {
        output
            .iter()
            .flat_map(|b| {
                let column = b.column_by_name("title").unwrap();
                let strings = column
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .unwrap();
                strings
                    .iter()
                    .map(|t| t.map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for (run, (rows, edition)) in [(3usize, "first"), (5, "second"), (2, "third")]
        .into_iter()
        .enumerate()
    {
        let dimension = batch_of(&plan.sources[content].schema, 4, &|name, i| match name {
            "id" => Some(format!("c{i}")),
            "title" => Some(format!("{edition} {i}")),
            _ => None,
        });
        let input = batch_of(&plan.sources[events].schema, rows, &|name, i| match name {
            "id" => Some(i.to_string()),
            "cid" => Some(format!("c{}", (i + run) % 4)),
            _ => None,
        });
        let joined = plan
            .execute(0, input, &[(content, dimension)])
            .await
            .unwrap();
        let expected: Vec<Option<String>> = (0..rows)
            .map(|i| Some(format!("{edition} {}", (i + run) % 4)))
            .collect();
        assert_eq!(titles(&joined), expected, "run {run}");
    }
}

/// A query that joins a dimension without a view hands its sink the rows in
/// the order of the changes (a hash join may permute them), so Redis lists
/// and position filters see them in commit order.
#[tokio::test]
async fn a_joining_query_without_a_view_keeps_the_changes_order() {
    let (plan, events, content) = events_left_join_content().await;
    let items = 97;
    let dimension = batch_of(
        &plan.sources[content].schema,
        items,
        &|name, i| match name {
            "id" => Some(format!("c{i}")),
            "title" => Some(format!("title {i}")),
            _ => None,
        },
    );
    let rows = 2000;
    // Content ids in a scrambled order, some missing from the dimension.
    let input = batch_of(&plan.sources[events].schema, rows, &|name, i| match name {
        "id" => Some(i.to_string()),
        "cid" => Some(format!("c{}", (i * 37 + 11) % (items + 13))),
        _ => None,
    });
    let output = plan
        .execute(0, input, &[(content, dimension)])
        .await
        .unwrap();
    let ids: Vec<i64> = output
        .iter()
        .flat_map(|b| {
            b.column_by_name("id")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    let in_order = ids == (0..rows as i64).collect::<Vec<_>>();
    assert!(
        in_order,
        "rows out of position order: {:?}",
        &ids[..40.min(ids.len())]
    );
}

#[tokio::test]
async fn a_udf_called_with_the_wrong_types_is_a_plan_error_naming_its_library() {
    let call = "device_family(device)";
    assert!(MISSION.contains(call), "test edit must apply");
    let sql = MISSION.replace(call, "device_family(device, user_id)");
    let spec = parse_job("engagement", &sql, &env).unwrap();
    let error = plan::JobPlan::new(&spec).await.unwrap_err().to_string();
    assert!(
        error.contains("UDF `device_family` takes (TEXT) but is called with (Utf8, Utf8)"),
        "{error}"
    );
    assert!(error.contains("libdevice_family"), "{error}");
}

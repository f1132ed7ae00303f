//! Tests of job SQL parsing and planning (no IO).

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "ENGAGE_POSTGRES_URL" => Some("postgres://engage:secret@127.0.0.1:5432/app".into()),
        "ENGAGE_REDIS_URL" => Some("redis://127.0.0.1:6379".into()),
        _ => None,
    }
}

const MISSION: &str = include_str!("../../../sql/engagement.sql");

#[test]
fn mission_pipeline_parses_with_watermark_key_and_options() {
    let spec = parse_job("engagement", MISSION, &env).unwrap();
    assert_eq!(spec.tables.len(), 4);
    let events = &spec.tables[0];
    assert_eq!(events.name, "engagement_events");
    assert_eq!(events.primary_key, vec!["id"]);
    let watermark = events.watermark.as_ref().unwrap();
    assert_eq!(watermark.column, "event_ts");
    assert_eq!(
        watermark.expression,
        "event_ts - INTERVAL '200 milliseconds'"
    );
    let Connector::Filesystem(fs) = &spec.tables[2].connector else {
        panic!("filesystem expected")
    };
    assert_eq!(fs.path, "./data/enriched_events");
    assert_eq!(fs.time_pattern.as_deref(), Some("event_date=%Y-%m-%d"));
    let Connector::Redis(redis) = &spec.tables[3].connector else {
        panic!("redis expected")
    };
    assert_eq!(redis.max_length, Some(50));
    assert_eq!(spec.inserts.len(), 2);
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
    for query in &plan.queries {
        assert_eq!(plan.sources[query.driving].def.name, "engagement_events");
        assert_eq!(query.dimensions, vec![1]);
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

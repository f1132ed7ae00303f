//! Values engage cannot represent (an infinite timestamp, a date before the
//! common era, a number out of the declared range, a number that is not one)
//! send their change to `dead_letter` with reason `decode_error:<column>` and
//! the row as Postgres sent it; the rest of the transaction flows. So does a
//! dimension's row in the initial snapshot. Without a `dead_letter` table the
//! job stops, naming the column.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{csv, dead_letters, has_committed_files, wait_for, World};

const SCHEMA: &str = "
CREATE TABLE readings (id BIGINT PRIMARY KEY, at TIMESTAMPTZ, day DATE, n BIGINT, x TEXT, note TEXT);
ALTER TABLE readings REPLICA IDENTITY FULL;
";

/// One transaction: good rows around one bad value of each kind; then an
/// update to a bad value, and an update and a delete of a good row.
const CHANGES: &str = "
BEGIN;
INSERT INTO readings VALUES
  (1, '2026-01-01 10:00:00+00', '2026-01-01', 7, '1.5', 'good'),
  (2, 'infinity', '2026-01-01', 7, '1.5', 'infinite timestamp'),
  (3, '2026-01-01 10:00:00+00', '0044-03-15 BC', 7, '1.5', 'date before the common era'),
  (4, '2026-01-01 10:00:00+00', '2026-01-01', 10000000000, '1.5', 'out of INT range'),
  (5, '2026-01-01 10:00:00+00', '2026-01-01', 7, 'abc', 'not a number'),
  (6, '2026-01-01 10:00:00+00', '-infinity', 7, '2.5', 'infinite date');
INSERT INTO readings VALUES (7, '2026-01-02 10:00:00+00', '2026-01-02', 8, '3.5', 'good');
COMMIT;
UPDATE readings SET at = 'infinity' WHERE id = 1;
UPDATE readings SET note = 'changed' WHERE id = 7;
DELETE FROM readings WHERE id = 7;
";

fn job_sql(data: &Path, dead_letter: bool) -> String {
    let mut sql = format!(
        "CREATE TABLE readings (id BIGINT, at TIMESTAMP, day DATE, n INT, x DOUBLE, note TEXT, PRIMARY KEY (id))
         WITH (connector = 'postgres-cdc', connection = '${{ENGAGE_POSTGRES_URL}}', table = 'public.readings');
         CREATE TABLE out WITH (connector = 'filesystem', path = '{data}/out', format = 'parquet');
         INSERT INTO out SELECT id, n, x, _op, _lsn, _seq FROM readings;",
        data = data.display()
    );
    if dead_letter {
        sql.push_str(&format!(
            "CREATE TABLE dead_letter WITH (connector = 'filesystem', path = '{}/dead_letter', format = 'parquet');",
            data.display()
        ));
    }
    sql
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_values_are_dead_lettered_and_the_transaction_flows() {
    let world = World::start().await;
    let client = world.sql().await;
    client.batch_execute(SCHEMA).await.unwrap();
    let (job, path) = world
        .start_named_job("readings", &job_sql(&world.data_dir(), true))
        .await;
    client.batch_execute(CHANGES).await.unwrap();

    wait_for(
        "every change in parquet",
        Duration::from_secs(30),
        || async {
            has_committed_files(&world.data_dir().join("out"))
                && csv(&path, "SELECT count(*) AS n FROM out").await == "n\n4\n"
        },
    )
    .await;
    wait_for("the dead letters", Duration::from_secs(30), || async {
        has_committed_files(&world.data_dir().join("dead_letter"))
            && csv(&path, "SELECT count(*) AS n FROM dead_letter").await == "n\n6\n"
    })
    .await;
    job.stop();

    let rows = csv(&path, "SELECT id, n, x, _op FROM out ORDER BY _lsn, _seq").await;
    assert_eq!(
        rows.lines().skip(1).collect::<Vec<_>>(),
        vec!["1,7,1.5,c", "7,8,3.5,c", "7,8,3.5,u", "7,8,3.5,d"],
        "{rows}"
    );
    let dead = dead_letters(&path).await;
    let reasons: Vec<(&str, &str)> = dead
        .iter()
        .map(|(reason, row)| (reason.as_str(), row["id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("decode_error:at", "2"),
            ("decode_error:day", "3"),
            ("decode_error:n", "4"),
            ("decode_error:x", "5"),
            ("decode_error:day", "6"),
            ("decode_error:at", "1"),
        ]
    );
    // The row as Postgres sent it, every column as text.
    assert_eq!(dead[0].1["at"], "infinity");
    assert_eq!(dead[1].1["day"], "0044-03-15 BC");
    assert_eq!(dead[2].1["n"], "10000000000");
    assert_eq!(dead[3].1["x"], "abc");
    assert_eq!(dead[5].1["note"], "good");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_dead_letter_table_the_job_stops_naming_the_column() {
    let world = World::start().await;
    let client = world.sql().await;
    client.batch_execute(SCHEMA).await.unwrap();
    let (mut job, _) = world
        .start_named_job("readings", &job_sql(&world.data_dir(), false))
        .await;
    client.batch_execute(CHANGES).await.unwrap();
    let status = job.wait_exit(
        Duration::from_secs(30),
        "stopping on the undecodable change",
    );
    assert!(!status.success());
    let log = job.log_tail();
    assert!(
        log.contains("cannot be decoded: column at holds a value engage cannot represent")
            && log.contains("declare a filesystem table `dead_letter`"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn text_postgres_cannot_stream_as_utf8_stops_the_job_with_what_to_do() {
    let world = World::start().await;
    // A SQL_ASCII database stores any bytes; the walsender cannot convert
    // them to the UTF-8 the job reads, on this try or any other.
    let url = {
        let admin = world.sql().await;
        admin
            .batch_execute(
                "CREATE DATABASE raw ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
            )
            .await
            .unwrap();
        let (base, _) = world.postgres_url.rsplit_once('/').unwrap();
        format!("{base}/raw")
    };
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.batch_execute(SCHEMA).await.unwrap();
    let sql = job_sql(&world.data_dir(), true).replace("${ENGAGE_POSTGRES_URL}", &url);
    let (mut job, _) = world.start_named_job("readings", &sql).await;
    client
        .batch_execute("INSERT INTO readings VALUES (1, now(), current_date, 1, '1', E'caf\\xe9')")
        .await
        .unwrap();
    let status = job.wait_exit(Duration::from_secs(30), "stopping on text it cannot stream");
    assert!(!status.success());
    let log = job.log_tail();
    assert!(
        log.contains("cannot stream a changed row as UTF-8")
            && log.contains("pg_replication_slot_advance"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dimension_row_the_snapshot_cannot_decode_is_dead_lettered_at_first_start() {
    let world = World::start().await;
    let client = world.sql().await;
    client
        .batch_execute(
            "CREATE TABLE kinds (id BIGINT PRIMARY KEY, since TIMESTAMPTZ);
             CREATE TABLE things (id BIGINT PRIMARY KEY, kind_id BIGINT);
             ALTER TABLE kinds REPLICA IDENTITY FULL;
             ALTER TABLE things REPLICA IDENTITY FULL;
             INSERT INTO kinds VALUES (1, '2026-01-01 00:00:00+00'), (2, 'infinity');",
        )
        .await
        .unwrap();
    let data = world.data_dir();
    let sql = format!(
        "CREATE TABLE kinds (id BIGINT, since TIMESTAMP, PRIMARY KEY (id))
         WITH (connector = 'postgres-cdc', connection = '${{ENGAGE_POSTGRES_URL}}', table = 'public.kinds');
         CREATE TABLE things (id BIGINT, kind_id BIGINT, PRIMARY KEY (id))
         WITH (connector = 'postgres-cdc', connection = '${{ENGAGE_POSTGRES_URL}}', table = 'public.things');
         CREATE TABLE out WITH (connector = 'filesystem', path = '{data}/out', format = 'parquet');
         INSERT INTO out SELECT t.id, k.since FROM things t LEFT JOIN kinds k ON t.kind_id = k.id;
         CREATE TABLE dead_letter WITH (connector = 'filesystem', path = '{data}/dead_letter', format = 'parquet');",
        data = data.display()
    );
    let (job, path) = world.start_named_job("kinds", &sql).await;
    client
        .batch_execute("INSERT INTO things VALUES (10, 1), (20, 2);")
        .await
        .unwrap();
    wait_for(
        "the rows and the dead letter",
        Duration::from_secs(30),
        || async {
            has_committed_files(&data.join("out"))
                && has_committed_files(&data.join("dead_letter"))
                && csv(&path, "SELECT count(*) AS n FROM out").await == "n\n2\n"
        },
    )
    .await;
    job.stop();
    let out = csv(&path, "SELECT id, since FROM out ORDER BY id").await;
    assert_eq!(out, "id,since\n10,2026-01-01T00:00:00Z\n20,\n", "{out}");
    let dead = csv(&path, "SELECT \"table\", reason, \"row\" FROM dead_letter").await;
    assert_eq!(
        dead.lines().skip(1).collect::<Vec<_>>(),
        [r#"kinds,decode_error:since,"{""id"":""2"",""since"":""infinity""}""#],
        "{dead}"
    );
}

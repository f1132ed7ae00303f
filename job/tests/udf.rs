//! UDFs built from `#[udf]` crates and loaded at run time, checked against the
//! same computation in Postgres: the shipped scalar `device_family`, the
//! shipped UDAF `median_engagement` in a tumbling window with a delete
//! retracting and NULLs, the shipped async UDF `engagement_label`, and a UDF crate the test writes itself, outside the
//! repository, that panics on one input (that row is dead-lettered, the rest
//! flow).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use support::{csv, dead_letters, wait_for, wait_started_as, World};

const SCHEMA: &str = "
CREATE TABLE engagement_events (id BIGINT PRIMARY KEY, device TEXT, event_ts TIMESTAMPTZ NOT NULL,
                                duration_ms INTEGER);
ALTER TABLE engagement_events REPLICA IDENTITY FULL;
";

fn job_sql(data: &Path, extra: &str) -> String {
    format!(
        "CREATE TABLE engagement_events (
            id BIGINT, device TEXT, event_ts TIMESTAMP, duration_ms INT,
            PRIMARY KEY (id),
            WATERMARK FOR event_ts AS event_ts - INTERVAL '1 second'
        ) WITH (connector = 'postgres-cdc', connection = '${{ENGAGE_POSTGRES_URL}}',
                table = 'public.engagement_events');
        CREATE TABLE families WITH (connector = 'filesystem', path = '{data}/families', format = 'parquet');
        INSERT INTO families SELECT id, device, device_family(device) AS family, device_family(' Roku') AS constant,
                                    engagement_label(duration_ms) AS label, _op FROM engagement_events;
        CREATE TABLE medians WITH (connector = 'filesystem', path = '{data}/medians', format = 'parquet');
        INSERT INTO medians
        SELECT window.start AS window_start, events, median_seconds
        FROM (SELECT tumble(INTERVAL '1 minute') AS window, count(*) AS events,
                     median_engagement(duration_ms / 1000.0) AS median_seconds
              FROM engagement_events GROUP BY window);
        CREATE TABLE dead_letter WITH (connector = 'filesystem', path = '{data}/dead_letter', format = 'parquet');
        {extra}",
        data = data.display()
    )
}

use engage::udf::bench::FAMILY_CASE;

/// `header` and then the (id, text) rows of a Postgres query, as CSV.
async fn postgres_csv(client: &tokio_postgres::Client, header: &str, sql: &str) -> String {
    let mut out = format!("{header}\n");
    for row in client.query(sql, &[]).await.unwrap() {
        out.push_str(&format!(
            "{},{}\n",
            row.get::<_, i64>(0),
            row.get::<_, String>(1)
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn shipped_udfs_equal_the_same_computation_in_postgres() {
    let world = World::start().await;
    let client = world.sql().await;
    client.batch_execute(SCHEMA).await.unwrap();
    let path = world.data_dir().join("udfs.sql");
    std::fs::create_dir_all(world.data_dir()).unwrap();
    std::fs::write(&path, job_sql(&world.data_dir(), "")).unwrap();
    let mut job = world.start_job_sql(&["run"], path.to_str().unwrap(), "0.3");
    wait_started_as(&world, &mut job, "udfs").await;

    // Three whole past minutes of events (NULL devices and durations among
    // them) and deletes inside them, in one transaction: once the source is
    // idle the wall clock drives the watermark and closes the three windows.
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO engagement_events
             SELECT i,
                    (ARRAY['ios', 'Android-Tablet', ' web-chrome', 'roku', 'tv', 'fridge', NULL, 'IPAD'])[1 + i % 8],
                    date_trunc('minute', now()) - interval '10 minutes' + (i * interval '900 milliseconds'),
                    CASE WHEN i % 11 = 0 THEN NULL ELSE (i * 7919) % 600000 END
             FROM generate_series(0, 199) i;
             DELETE FROM engagement_events WHERE id IN (3, 10, 17, 44, 150);
             COMMIT;",
        )
        .await
        .unwrap();
    let sql = path.clone();
    wait_for("the three windows closed", Duration::from_secs(60), || {
        let sql = sql.clone();
        async move {
            support::has_committed_files(&sql.parent().unwrap().join("medians"))
                && csv(&sql, "SELECT count(*) AS n FROM medians")
                    .await
                    .lines()
                    .nth(1)
                    == Some("3")
        }
    })
    .await;

    // Scalar: every insert's family equals the CASE in Postgres.
    let ours = csv(
        &path,
        "SELECT id, coalesce(family, 'NULL') AS f FROM families WHERE _op = 'c' ORDER BY id",
    )
    .await;
    let want = postgres_csv(
        &client,
        "id,f",
        &format!(
            "SELECT i::bigint, coalesce(family, 'NULL') FROM generate_series(0, 199) i,
             LATERAL (SELECT (ARRAY['ios', 'Android-Tablet', ' web-chrome', 'roku', 'tv', 'fridge', NULL, 'IPAD'])[1 + i % 8] AS device) d,
             LATERAL (SELECT {FAMILY_CASE} AS family) f ORDER BY i"
        ),
    )
    .await;
    assert_eq!(ours, want);

    // Async: `engagement_label` (one call per row, results in row order;
    // NULL for a NULL duration, which the function does not take).
    let ours = csv(
        &path,
        "SELECT id, coalesce(label, 'NULL') AS l FROM families WHERE _op = 'c' ORDER BY id",
    )
    .await;
    let want = postgres_csv(
        &client,
        "id,l",
        "SELECT i::bigint, coalesce(CASE WHEN d IS NULL THEN NULL WHEN d < 10000 THEN 'bounce'
                                         WHEN d < 60000 THEN 'short' WHEN d < 600000 THEN 'engaged'
                                         ELSE 'deep' END, 'NULL')
         FROM generate_series(0, 199) i,
         LATERAL (SELECT CASE WHEN i % 11 = 0 THEN NULL ELSE (i * 7919) % 600000 END AS d) x ORDER BY i",
    )
    .await;
    assert_eq!(ours, want);

    // A call on a constant is one value (DataFusion may fold it at plan time).
    let constant = csv(&path, "SELECT DISTINCT constant FROM families").await;
    assert_eq!(constant, "constant\ntv\n");

    // UDAF: the median per minute, deletes taken back out, NULLs left out,
    // equals percentile_cont(0.5) over what Postgres still holds.
    let ours = csv(
        &path,
        "SELECT CAST(window_start AS VARCHAR) AS w, events, round(median_seconds, 6) AS m FROM medians ORDER BY window_start",
    )
    .await;
    let rows = client
        .query(
            "SELECT date_trunc('minute', event_ts AT TIME ZONE 'UTC'), count(*),
                    round(percentile_cont(0.5) WITHIN GROUP (ORDER BY (duration_ms / 1000.0)::float8)::numeric, 6)::float8
             FROM engagement_events GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let ours: Vec<(i64, f64)> = ours
        .lines()
        .skip(1)
        .map(|l| {
            let parts: Vec<&str> = l.split(',').collect();
            (parts[1].parse().unwrap(), parts[2].parse().unwrap())
        })
        .collect();
    let want: Vec<(i64, f64)> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(1), r.get::<_, f64>(2)))
        .collect();
    assert_eq!(ours, want);
    job.stop();
}

/// A UDF crate `name` outside the repository, as a user would write it,
/// with `lib_rs` as its source.
fn write_crate(dir: &Path, name: &str, lib_rs: &str) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\narroyo-udf-plugin = \"0.2\"\n\n[workspace]\n"
        ),
    )
    .unwrap();
    // The repository's lock file: the same dependency versions, already built.
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../udfs/engagement_label/Cargo.lock"
        ),
        dir.join("Cargo.lock"),
    )
    .unwrap();
    std::fs::write(dir.join("src/lib.rs"), lib_rs).unwrap();
}

const SHOUT: &str = "use arroyo_udf_plugin::udf;

#[udf]
fn shout(device: &str) -> String {
    if device == \"boom\" {
        panic!(\"cannot shout boom\");
    }
    device.to_uppercase()
}
";

/// An async UDF that never answers for one input: its call times out.
const SLEEPY: &str = "use arroyo_udf_plugin::async_udf::tokio;
use arroyo_udf_plugin::udf;

#[udf(unordered, timeout = \"300ms\")]
async fn shout(device: &str) -> String {
    if device == \"boom\" {
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    }
    device.to_uppercase()
}
";

#[tokio::test(flavor = "multi_thread")]
async fn a_udf_that_panics_dead_letters_only_its_rows() {
    rows_a_udf_fails_on_are_dead_lettered("shout", SHOUT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_async_udf_that_times_out_dead_letters_only_its_rows() {
    rows_a_udf_fails_on_are_dead_lettered("sleepy", SLEEPY).await;
}

/// A crate `crate_name` whose UDF `shout` fails on the device "boom": that
/// row is dead-lettered, every other flows.
async fn rows_a_udf_fails_on_are_dead_lettered(crate_name: &str, lib_rs: &str) {
    let world = World::start().await;
    let client = world.sql().await;
    client.batch_execute(SCHEMA).await.unwrap();
    let crate_dir = tempfile::tempdir().unwrap();
    write_crate(crate_dir.path(), crate_name, lib_rs);
    let data = world.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    let extra = format!(
        "CREATE TABLE shouted WITH (connector = 'filesystem', path = '{0}/shouted', format = 'parquet');
         INSERT INTO shouted SELECT id, shout(device) AS loud FROM engagement_events;",
        data.display()
    );
    let path = data.join("panics.sql");
    std::fs::write(&path, job_sql(&data, &extra)).unwrap();
    let crate_arg = crate_dir.path().to_str().unwrap().to_string();
    // The synchronous crate comes with --udf, the async one through ENGAGE_UDF_PATH.
    let mut job = if lib_rs.contains("async fn") {
        world.start_job_env(
            &["run"],
            path.to_str().unwrap(),
            "0.3",
            &[("ENGAGE_UDF_PATH", &crate_arg)],
        )
    } else {
        world.start_job_sql(&["run", "--udf", &crate_arg], path.to_str().unwrap(), "0.3")
    };
    wait_started_as(&world, &mut job, "panics").await;

    // One transaction: the panicking row lands in the same batch as others.
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO engagement_events VALUES
               (1, 'ios', now(), 10), (2, 'boom', now(), 20), (3, 'web', now(), 30);
             COMMIT;
             INSERT INTO engagement_events VALUES (4, 'tv', now(), 40);",
        )
        .await
        .unwrap();
    let sql = path.clone();
    wait_for(
        "the rows after the panic flowed",
        Duration::from_secs(60),
        || {
            let sql = sql.clone();
            async move {
                support::has_committed_files(&sql.parent().unwrap().join("shouted"))
                    && csv(&sql, "SELECT count(*) AS n FROM shouted WHERE id = 4")
                        .await
                        .lines()
                        .nth(1)
                        == Some("1")
            }
        },
    )
    .await;
    job.stop();

    let shouted = csv(&path, "SELECT id, loud FROM shouted ORDER BY id").await;
    assert_eq!(shouted, "id,loud\n1,IOS\n3,WEB\n4,TV\n");
    // A query that does not call the UDF keeps every row.
    let families = csv(&path, "SELECT id, family FROM families ORDER BY id").await;
    assert_eq!(families, "id,family\n1,mobile\n2,other\n3,web\n4,tv\n");
    let dead = dead_letters(&path).await;
    let reasons: BTreeMap<String, usize> = dead.iter().fold(BTreeMap::new(), |mut m, (r, _)| {
        *m.entry(r.clone()).or_default() += 1;
        m
    });
    assert_eq!(
        reasons,
        BTreeMap::from([("udf_error:shout".to_string(), 1)])
    );
    assert_eq!(dead[0].1["device"], "boom");

    // `engage udf list` shows it with its signature, built.
    let listed = world
        .engage(&["udf", "list", "--udf", &crate_arg])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("shout(TEXT) -> TEXT"), "{listed}");
    assert!(listed.contains("built:"), "{listed}");
}

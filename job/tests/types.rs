//! Postgres types users have, beyond the built-in scalars: enum columns read
//! as text, domain columns as their base type, through the initial snapshot
//! of a dimension and through the change stream alike.

mod support;

use std::time::Duration;

use support::{csv, has_committed_files, wait_for, World};

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('happy', 'sad', 'ok');
CREATE DOMAIN percent AS INTEGER CHECK (VALUE BETWEEN 0 AND 100);
CREATE DOMAIN label AS TEXT;
CREATE TABLE kinds (id BIGINT PRIMARY KEY, name label);
CREATE TABLE feelings (id BIGINT PRIMARY KEY, kind_id BIGINT, how mood, score percent, tag label);
ALTER TABLE kinds REPLICA IDENTITY FULL;
ALTER TABLE feelings REPLICA IDENTITY FULL;
INSERT INTO kinds VALUES (1, 'first'), (2, 'second');
";

#[tokio::test(flavor = "multi_thread")]
async fn enum_and_domain_columns_read_as_text_and_their_base_type() {
    let world = World::start().await;
    let client = world.sql().await;
    client.batch_execute(SCHEMA).await.unwrap();
    let data = world.data_dir();
    let sql = format!(
        "CREATE TABLE kinds (id BIGINT, name TEXT, PRIMARY KEY (id))
         WITH (connector = 'postgres-cdc', connection = '${{ENGAGE_POSTGRES_URL}}', table = 'public.kinds');
         CREATE TABLE feelings (id BIGINT, kind_id BIGINT, how TEXT, score INT, tag TEXT, PRIMARY KEY (id))
         WITH (connector = 'postgres-cdc', connection = '${{ENGAGE_POSTGRES_URL}}', table = 'public.feelings');
         CREATE TABLE out WITH (connector = 'filesystem', path = '{data}/out', format = 'parquet');
         INSERT INTO out
         SELECT f.id, k.name, f.how, f.score + 1 AS next_score, upper(f.tag) AS tag, f._op, f._lsn, f._seq
         FROM feelings f LEFT JOIN kinds k ON f.kind_id = k.id;",
        data = data.display()
    );
    let (job, path) = world.start_named_job("types", &sql).await;
    client
        .batch_execute(
            "INSERT INTO feelings VALUES (1, 1, 'happy', 99, 'a'), (2, 2, 'sad', 0, NULL);
             UPDATE feelings SET how = 'ok', score = 50 WHERE id = 2;",
        )
        .await
        .unwrap();
    wait_for(
        "the changes in parquet",
        Duration::from_secs(30),
        || async {
            has_committed_files(&data.join("out"))
                && csv(&path, "SELECT count(*) AS n FROM out").await == "n\n3\n"
        },
    )
    .await;
    job.stop();
    let rows = csv(
        &path,
        "SELECT id, name, how, next_score, tag, _op FROM out ORDER BY _lsn, _seq",
    )
    .await;
    assert_eq!(
        rows.lines().skip(1).collect::<Vec<_>>(),
        vec![
            "1,first,happy,100,A,c",
            "2,second,sad,1,,c",
            "2,second,ok,51,,u"
        ],
        "{rows}"
    );
}

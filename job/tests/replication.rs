//! The replication reader alone, against real Postgres: where its batches
//! end at commits (the only places the engine may checkpoint at) around
//! backfill watermarks and runs of large transactions.

mod support;

use std::time::{Duration, Instant};

use engage::change::format_lsn;
use engage::source::postgres::{open, Start};
use engage::source::replication::{BatchOptions, SourceEvent, SourceHandle};
use support::*;

/// A reader of `engagement_events` (a fresh slot) with `batching`, and a
/// client with the schema and five content items.
async fn reader(world: &World, batching: BatchOptions) -> (SourceHandle, tokio_postgres::Client) {
    let client = world.sql().await;
    engage::generate::ensure_schema(&client).await.unwrap();
    engage::generate::seed_content(&client, 5, 7).await.unwrap();
    let script = format!(
        "CREATE TABLE engagement_events (id BIGINT, content_id TEXT, PRIMARY KEY (id)) \
         WITH (connector = 'postgres-cdc', connection = '{}', table = 'public.engagement_events'); \
         CREATE TABLE out WITH (connector = 'filesystem', path = '{}/out', format = 'parquet'); \
         INSERT INTO out SELECT id, content_id, _op, _lsn, _seq FROM engagement_events;",
        world.postgres_url,
        world.data_dir().display()
    );
    let spec = engage::sql::parse_job("reader", &script, &|_| None).unwrap();
    let plan = engage::sql::plan::JobPlan::new(&spec).await.unwrap();
    let windowed = vec![Vec::new(); plan.sources.len()];
    let (mut pg, start) = open("reader", &plan.sources, &windowed, None, "(none)")
        .await
        .unwrap();
    let Start::Fresh { lsn, .. } = start else {
        panic!("a new job starts fresh")
    };
    let source = pg.stream(&plan.sources, lsn, None, batching).await.unwrap();
    (source, client)
}

/// An `INSERT` of `events` events, all of one content item.
fn insert(events: u32) -> String {
    format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device) \
         SELECT (SELECT id FROM content LIMIT 1), gen_random_uuid(), 'play', now(), 1000, 'ios' \
         FROM generate_series(1, {events})"
    )
}

/// The next event, failing the test after a minute without one.
async fn next(source: &mut SourceHandle) -> SourceEvent {
    tokio::time::timeout(Duration::from_secs(60), source.events.recv())
        .await
        .expect("an event within a minute")
        .expect("the reader runs")
        .unwrap()
}

/// A watermark's commit is a boundary only once the watermark itself is
/// delivered. The changes before it (in its own transaction, or in one just
/// before, still pending in the reader) come first, and must not carry its
/// commit: the engine may checkpoint after any batch that ends at a commit,
/// and a checkpoint there resumes past a watermark it never handled. Lost
/// so, a low watermark made the restart read its chunk again at new
/// positions, and the Kafka topic held those rows twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_boundary_before_a_watermark_passes_its_commit() {
    let world = World::start().await;
    // Nothing is cut by size or time: only commits and markers cut batches.
    let batching = BatchOptions {
        max_batch_rows: 1_000_000,
        linger: Duration::from_secs(600),
    };
    let (mut source, client) = reader(&world, batching).await;
    // Rows and a watermark in one transaction; then rows, and a watermark
    // in the next transaction, in one round trip (no keepalive between).
    let insert = insert(2);
    client
        .batch_execute(&format!(
            "BEGIN; {insert}; SELECT pg_logical_emit_message(true, 'engage.backfill', 'same'); COMMIT; \
             BEGIN; {insert}; COMMIT; \
             BEGIN; SELECT pg_logical_emit_message(true, 'engage.backfill', 'next'); COMMIT;"
        ))
        .await
        .unwrap();

    // The furthest LSN at which the engine could have checkpointed so far.
    let mut boundary = 0u64;
    let (mut markers, mut rows) = (Vec::new(), 0);
    while markers.len() < 2 {
        match next(&mut source).await {
            SourceEvent::Changes {
                batch, commit_end, ..
            } => {
                rows += batch.num_rows();
                boundary = boundary.max(commit_end.unwrap_or(0));
            }
            SourceEvent::Idle { lsn } => boundary = boundary.max(lsn),
            SourceEvent::Marker {
                content,
                commit_end,
                ..
            } => {
                let name = String::from_utf8_lossy(&content).to_string();
                assert!(
                    boundary < commit_end,
                    "a boundary at {} was delivered before marker `{name}`, whose commit ends at {}: a \
                     checkpoint there would resume past the marker",
                    format_lsn(boundary),
                    format_lsn(commit_end)
                );
                boundary = commit_end;
                markers.push(name);
            }
            _ => {}
        }
    }
    assert_eq!(markers, ["same", "next"]);
    assert_eq!(rows, 4, "the four rows inserted");
    source.stop();
}

/// A transaction larger than a batch is cut inside; its commit still ends
/// a batch, even when the rest pending there is small and a next large
/// transaction follows at once. Otherwise a backlog of large transactions
/// reached the engine without one boundary, and one epoch (its capture and
/// Parquet rows, in memory until its checkpoint) held all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_large_transaction_ends_at_a_boundary() {
    let world = World::start().await;
    // Cut by size alone (100 rows, or 50 at a commit), never by time.
    let batching = BatchOptions {
        max_batch_rows: 100,
        linger: Duration::from_secs(600),
    };
    let (mut source, client) = reader(&world, batching).await;
    // Three transactions of 230 rows, back to back: 30 rows are pending at
    // each commit, fewer than the 50 that cut a batch at a commit.
    let insert = insert(230);
    client
        .batch_execute(&format!(
            "BEGIN; {insert}; COMMIT; BEGIN; {insert}; COMMIT; BEGIN; {insert}; COMMIT;"
        ))
        .await
        .unwrap();
    let (mut rows, mut boundaries) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows < 690 {
        assert!(Instant::now() < deadline, "690 rows within a minute");
        if let SourceEvent::Changes {
            batch, commit_end, ..
        } = next(&mut source).await
        {
            rows += batch.num_rows();
            if commit_end.is_some() {
                boundaries.push(rows);
            }
        }
    }
    assert_eq!(
        boundaries,
        [230, 460, 690],
        "batches ending at a commit, by rows delivered so far"
    );
    source.stop();
}

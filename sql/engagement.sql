-- engage's mission pipeline: every engagement event, as it commits, enriched
-- with its content as it stood at that moment, delivered to
--   * Parquet (`enriched_events`, one row per change, partitioned by event date)
--     for BigQuery load jobs and DataFusion queries;
--   * Redis (`engage:recent:{content_id}`: the 50 newest events of each content).
-- Names of sink tables and Redis keys are a contract other tools rely on.

CREATE TABLE engagement_events (
    id          BIGINT,
    content_id  TEXT,
    user_id     TEXT,
    event_type  TEXT,
    event_ts    TIMESTAMP,
    duration_ms INT,
    device      TEXT,
    raw_payload TEXT,
    PRIMARY KEY (id),
    WATERMARK FOR event_ts AS event_ts - INTERVAL '200 milliseconds'
) WITH (
    connector  = 'postgres-cdc',
    connection = '${ENGAGE_POSTGRES_URL}',
    table      = 'public.engagement_events'
);

-- Read as a dimension: kept in memory, updated in commit order, so each event
-- joins the content row as it was when the event committed.
CREATE TABLE content (
    id             TEXT,
    slug           TEXT,
    title          TEXT,
    content_type   TEXT,
    length_seconds INT,
    publish_ts     TIMESTAMP,
    PRIMARY KEY (id)
) WITH (
    connector  = 'postgres-cdc',
    connection = '${ENGAGE_POSTGRES_URL}',
    table      = 'public.content'
);

CREATE VIEW enriched AS
SELECT e.id,
       e.content_id,
       e.user_id,
       e.event_type,
       e.event_ts,
       e.duration_ms,
       e.device,
       c.content_type,
       c.length_seconds,
       e.duration_ms / 1000.0                           AS engagement_seconds,
       engagement_pct(e.duration_ms, c.length_seconds)  AS engagement_pct,
       e._op,
       e._lsn,
       e._seq
FROM engagement_events e
LEFT JOIN content c ON e.content_id = c.id;

-- Every change of every event (inserts `c`, updates `u`, deletes `d`).
CREATE TABLE enriched_events WITH (
    connector = 'filesystem',
    path      = '${ENGAGE_DATA_DIR}/enriched_events',
    format    = 'parquet',
    'partitioning.time_pattern' = 'event_date=%Y-%m-%d'
);

INSERT INTO enriched_events SELECT * FROM enriched;

-- The 50 newest events of each content item, newest first, as JSON.
CREATE TABLE recent_events WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    format    = 'json',
    target    = 'list',
    'target.key_prefix' = 'engage:recent:',
    'target.key_column' = 'content_id',
    'target.max_length' = '50',
    'target.operation'  = 'prepend'
);

INSERT INTO recent_events
SELECT id, content_id, user_id, event_type, event_ts, duration_ms, device,
       content_type, length_seconds, engagement_seconds, engagement_pct
FROM enriched
WHERE _op = 'c' AND content_id IS NOT NULL;

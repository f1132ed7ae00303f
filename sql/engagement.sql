-- engage's mission pipeline: every engagement event, as it commits, enriched
-- with its content as it stood at that moment, delivered to
--   * Parquet (`enriched_events`, one row per change, partitioned by event date)
--     for BigQuery load jobs and DataFusion queries;
--   * Redis (`engage:recent:{content_id}`: the 50 newest events of each content);
--   * Kafka (topic `engage.enriched_events`, one JSON message per change, keyed
--     by content id) for outside systems.
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
    WATERMARK FOR event_ts AS event_ts - INTERVAL '200 milliseconds',
    -- Bad input: a row failing one of these goes to `dead_letter` (reason =
    -- the constraint's name) and the job goes on. As in SQL, NULL passes.
    CONSTRAINT content_missing    CHECK (content_id IS NOT NULL),
    CONSTRAINT unknown_event_type CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    CONSTRAINT bad_duration       CHECK (duration_ms BETWEEN 0 AND 86400000),
    CONSTRAINT payload_not_object CHECK (raw_payload IS NULL OR starts_with(ltrim(raw_payload), '{')),
    CONSTRAINT payload_too_large  CHECK (raw_payload IS NULL OR octet_length(raw_payload) <= 1048576),
    CONSTRAINT unknown_content    CHECK (content_id IN (SELECT id FROM content))
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

-- The 50 newest events of each content item, newest first, as JSON. With
-- `target.id_column`, `_op` says what a row does: an insert (`c`) is pushed,
-- a delete (`d`) removes the event from its list (`_op` is not written).
CREATE TABLE recent_events WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    format    = 'json',
    target    = 'list',
    'target.key_prefix' = 'engage:recent:',
    'target.key_column' = 'content_id',
    'target.max_length' = '50',
    'target.operation'  = 'prepend',
    'target.id_column'  = 'id'
);

INSERT INTO recent_events
SELECT id, content_id, user_id, event_type, event_ts, duration_ms, device,
       content_type, length_seconds, engagement_seconds, engagement_pct, _op
FROM enriched
WHERE _op IN ('c', 'd') AND content_id IS NOT NULL;

-- ---------------------------------------------------------------------------
-- Windowed engagement. Windows are on event time (`event_ts`, via the WATERMARK
-- above). A hop window of 10 minutes sliding every 500 ms is emitted when the
-- watermark (newest event time - 200 ms) passes its end, so a committed event
-- is reflected in Redis at most ~500 ms + 200 ms + processing after its event
-- time (about 450 ms on average): under the 1 s freshness target, while a
-- smaller slide would re-rank all active content more often for little gain.
-- ---------------------------------------------------------------------------

-- The most engaged content of the last 10 minutes: top 100 by engagement seconds.
CREATE TABLE top_content WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    target    = 'sorted_set',
    'target.key_prefix'    = 'engage:top_content:10m',
    'target.member_column' = 'content_id',
    'target.score_column'  = 'score',
    'target.max_length'    = '100'
);

INSERT INTO top_content
SELECT content_id, score
FROM (
    SELECT content_id, score,
           ROW_NUMBER() OVER (PARTITION BY window ORDER BY score DESC, content_id) AS rank
    FROM (
        SELECT hop(INTERVAL '500 milliseconds', INTERVAL '10 minutes') AS window,
               content_id,
               coalesce(sum(engagement_seconds), 0) AS score
        FROM enriched
        WHERE content_id IS NOT NULL
        GROUP BY window, content_id
    )
)
WHERE rank <= 100;

-- Engagement seconds by content type over the last 10 minutes.
CREATE TABLE content_type_engagement WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    target    = 'hash',
    'target.key_prefix'   = 'engage:content_type:10m',
    'target.field_column' = 'content_type',
    'target.value_column' = 'seconds'
);

INSERT INTO content_type_engagement
SELECT coalesce(content_type, 'unknown') AS content_type,
       coalesce(sum(engagement_seconds), 0) AS seconds
FROM enriched
GROUP BY coalesce(content_type, 'unknown'), hop(INTERVAL '500 milliseconds', INTERVAL '10 minutes');

-- Events per device over the last 10 minutes.
CREATE TABLE top_devices WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    target    = 'sorted_set',
    'target.key_prefix'    = 'engage:top_devices:10m',
    'target.member_column' = 'device',
    'target.score_column'  = 'events'
);

INSERT INTO top_devices
SELECT coalesce(device, 'unknown') AS device, count(*) AS events
FROM enriched
GROUP BY coalesce(device, 'unknown'), hop(INTERVAL '500 milliseconds', INTERVAL '10 minutes');

-- Events per device family over the last 10 minutes. `device_family` is a UDF:
-- the crate udfs/device_family (arroyo-udf-plugin's #[udf]), built and loaded
-- by engage at start (ios/android -> mobile, web-* -> web, tv/roku/... -> tv).
CREATE TABLE top_device_families WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    target    = 'sorted_set',
    'target.key_prefix'    = 'engage:top_device_families:10m',
    'target.member_column' = 'family',
    'target.score_column'  = 'events'
);

INSERT INTO top_device_families
SELECT coalesce(device_family(device), 'unknown') AS family, count(*) AS events
FROM enriched
GROUP BY coalesce(device_family(device), 'unknown'), hop(INTERVAL '500 milliseconds', INTERVAL '10 minutes');

-- Multi-timeframe KPIs over tumbling windows: one view per timeframe. The
-- 1-minute one has the median engagement too: `median_engagement` is a UDAF
-- (udfs/median_engagement) that sees every value of the window, so longer
-- timeframes leave it out (NULL) rather than keep a day of values.
CREATE VIEW kpi_1m AS
SELECT '1m' AS timeframe,
       window.start AS window_start,
       window.end   AS window_end,
       events, plays, finishes, distinct_users,
       engagement_seconds, avg_engagement_seconds, avg_engagement_pct,
       median_engagement_seconds
FROM (
    SELECT tumble(INTERVAL '1 minute') AS window,
           count(*) AS events,
           count(*) FILTER (WHERE event_type = 'play') AS plays,
           count(*) FILTER (WHERE event_type = 'finish') AS finishes,
           count(DISTINCT user_id) AS distinct_users,
           coalesce(sum(engagement_seconds), 0) AS engagement_seconds,
           avg(engagement_seconds) AS avg_engagement_seconds,
           avg(engagement_pct) AS avg_engagement_pct,
           median_engagement(engagement_seconds) AS median_engagement_seconds
    FROM enriched
    GROUP BY window
);

CREATE VIEW kpi_15m AS
SELECT '15m' AS timeframe,
       window.start AS window_start,
       window.end   AS window_end,
       events, plays, finishes, distinct_users,
       engagement_seconds, avg_engagement_seconds, avg_engagement_pct,
       CAST(NULL AS DOUBLE) AS median_engagement_seconds
FROM (
    SELECT tumble(INTERVAL '15 minutes') AS window,
           count(*) AS events,
           count(*) FILTER (WHERE event_type = 'play') AS plays,
           count(*) FILTER (WHERE event_type = 'finish') AS finishes,
           count(DISTINCT user_id) AS distinct_users,
           coalesce(sum(engagement_seconds), 0) AS engagement_seconds,
           avg(engagement_seconds) AS avg_engagement_seconds,
           avg(engagement_pct) AS avg_engagement_pct
    FROM enriched
    GROUP BY window
);

CREATE VIEW kpi_1h AS
SELECT '1h' AS timeframe,
       window.start AS window_start,
       window.end   AS window_end,
       events, plays, finishes, distinct_users,
       engagement_seconds, avg_engagement_seconds, avg_engagement_pct,
       CAST(NULL AS DOUBLE) AS median_engagement_seconds
FROM (
    SELECT tumble(INTERVAL '1 hour') AS window,
           count(*) AS events,
           count(*) FILTER (WHERE event_type = 'play') AS plays,
           count(*) FILTER (WHERE event_type = 'finish') AS finishes,
           count(DISTINCT user_id) AS distinct_users,
           coalesce(sum(engagement_seconds), 0) AS engagement_seconds,
           avg(engagement_seconds) AS avg_engagement_seconds,
           avg(engagement_pct) AS avg_engagement_pct
    FROM enriched
    GROUP BY window
);

CREATE VIEW kpi_24h AS
SELECT '24h' AS timeframe,
       window.start AS window_start,
       window.end   AS window_end,
       events, plays, finishes, distinct_users,
       engagement_seconds, avg_engagement_seconds, avg_engagement_pct,
       CAST(NULL AS DOUBLE) AS median_engagement_seconds
FROM (
    SELECT tumble(INTERVAL '24 hours') AS window,
           count(*) AS events,
           count(*) FILTER (WHERE event_type = 'play') AS plays,
           count(*) FILTER (WHERE event_type = 'finish') AS finishes,
           count(DISTINCT user_id) AS distinct_users,
           coalesce(sum(engagement_seconds), 0) AS engagement_seconds,
           avg(engagement_seconds) AS avg_engagement_seconds,
           avg(engagement_pct) AS avg_engagement_pct
    FROM enriched
    GROUP BY window
);

-- Every closed KPI window, for analytics.
CREATE TABLE kpi WITH (
    connector = 'filesystem',
    path      = '${ENGAGE_DATA_DIR}/kpi',
    format    = 'parquet',
    'partitioning.time_pattern' = 'window_date=%Y-%m-%d',
    'partitioning.time_column'  = 'window_start'
);

INSERT INTO kpi
SELECT * FROM kpi_1m
UNION ALL SELECT * FROM kpi_15m
UNION ALL SELECT * FROM kpi_1h
UNION ALL SELECT * FROM kpi_24h;

-- The latest closed 1m window, one field per KPI.
CREATE TABLE kpi_1m_latest WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    target    = 'hash',
    'target.key_prefix' = 'engage:kpi:1m'
);

INSERT INTO kpi_1m_latest SELECT * FROM kpi_1m;

-- The latest closed 15m window, one field per KPI.
CREATE TABLE kpi_15m_latest WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    target    = 'hash',
    'target.key_prefix' = 'engage:kpi:15m'
);

INSERT INTO kpi_15m_latest SELECT * FROM kpi_15m;

-- The latest closed 1h window, one field per KPI.
CREATE TABLE kpi_1h_latest WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    target    = 'hash',
    'target.key_prefix' = 'engage:kpi:1h'
);

INSERT INTO kpi_1h_latest SELECT * FROM kpi_1h;

-- The latest closed 24h window, one field per KPI.
CREATE TABLE kpi_24h_latest WITH (
    connector = 'redis',
    address   = '${ENGAGE_REDIS_URL}',
    target    = 'hash',
    'target.key_prefix' = 'engage:kpi:24h'
);

INSERT INTO kpi_24h_latest SELECT * FROM kpi_24h;

-- Every change of every event, for outside systems: one JSON message per
-- change (the row, with `_op`, `_lsn`, `_seq`), keyed by `content_id` so one
-- content's events stay in commit order. Exactly once to any consumer across
-- crashes (see job/src/sink/kafka/mod.rs); the topic is created if missing.
CREATE TABLE enriched_events_topic WITH (
    connector         = 'kafka',
    bootstrap_servers = '${ENGAGE_KAFKA_BROKERS}',
    topic             = 'engage.enriched_events',
    type              = 'sink',
    format            = 'json',
    'sink.key_field'  = 'content_id'
);

INSERT INTO enriched_events_topic SELECT * FROM enriched;

-- Inserts that arrive behind a windowed query's watermark are not aggregated;
-- the job writes them here (the query they missed, the watermark, their source
-- position and the original row as JSON) instead of dropping them.
CREATE TABLE late_events WITH (
    connector = 'filesystem',
    path      = '${ENGAGE_DATA_DIR}/late_events',
    format    = 'parquet'
);

-- Change rows that fail a CHECK above, with the reason, position and original row.
CREATE TABLE dead_letter WITH (
    connector = 'filesystem',
    path      = '${ENGAGE_DATA_DIR}/dead_letter',
    format    = 'parquet'
);

-- Finished plays, as they commit, posted to an outside service: each event
-- enriched with its content as in the mission pipeline (sql/engagement.sql),
-- sent as JSON in batches of up to 100 rows and signed as Standard Webhooks
-- specify (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
--
--   ENGAGE_WEBHOOK_URL=https://notify.example.com/engage \
--   ENGAGE_WEBHOOK_SECRET=whsec_$(head -c 32 /dev/urandom | base64) \
--   engage run sql/examples/webhook.sql
--
-- Delivery is at least once, and a batch is only ever sent under one
-- `webhook-id`: a receiver that skips ids it has already processed sees every
-- finished play exactly once, across crashes and replays. Names (the sink
-- `finished_plays`, the variables) are a contract.

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

CREATE TABLE finished_plays WITH (
    connector = 'webhook',
    endpoint  = '${ENGAGE_WEBHOOK_URL}',
    format    = 'json',
    'webhook.secret'     = '${ENGAGE_WEBHOOK_SECRET}',
    'webhook.batch_size' = '100'
);

-- `_lsn` and `_seq` (the change's position) are required: each batch's
-- `webhook-id` is derived from its rows' positions.
INSERT INTO finished_plays
SELECT e.id,
       e.content_id,
       e.user_id,
       e.event_ts,
       e.duration_ms,
       e.device,
       c.title,
       c.content_type,
       c.length_seconds,
       e._lsn,
       e._seq
FROM engagement_events e
LEFT JOIN content c ON e.content_id = c.id
WHERE e.event_type = 'finish' AND e._op = 'c';

-- Batches the endpoint refuses (a 4xx other than 408 and 429) land here, one
-- row per event, reason `webhook_rejected:<status>`, with the response's
-- first KiB; the job goes on.
CREATE TABLE dead_letter WITH (
    connector = 'filesystem',
    path      = '${ENGAGE_DATA_DIR}/webhook/dead_letter',
    format    = 'parquet'
);

//! The `postgres-cdc` connector: checks, publication, slot, and the streaming loop.
//!
//! # Start-up
//!
//! Before anything streams, [`preflight`] checks on a normal connection that
//! `wal_level` is `logical`, that the role may replicate and read each table,
//! that each table has a usable replica identity (`FULL`, an index, or
//! `DEFAULT` with a primary key) and has the declared columns. Each failure
//! is an error saying what to change.
//!
//! A table that drives windowed queries needs `REPLICA IDENTITY FULL`: under
//! `DEFAULT` (or an index) a delete carries only the key and an update no
//! old row, so a window could not take back what the old row added and its
//! rankings would over-count without a sign. The job fails closed instead,
//! naming the table, the queries and the `ALTER TABLE` to run; with the
//! table option `'replica_identity.autoset' = 'full'` it runs that itself
//! where its role owns the table, and says so in the log. Then the job's publication is created or
//! extended to cover its tables.
//!
//! # Slot and start position
//!
//! A job's first start creates its slot with `EXPORT_SNAPSHOT` on a gated
//! replication session, loads its dimension tables inside that snapshot
//! ([`super::snapshot`]) and starts streaming at the slot's consistent point:
//! every change after the snapshot arrives through the stream, none before.
//! Events already in the tables are history, which this connector does not
//! read. A restarted job streams from its checkpoint's resume LSN and
//! acknowledges nothing beyond it until the next checkpoint.
//!
//! # Batching and feedback
//!
//! The reader runs in its own task and decodes pgoutput straight into Arrow
//! builders. It cuts a batch when the table changes (so the engine applies a
//! dimension change exactly between the events around it), at
//! `max_batch_rows`, or at a commit once `linger` has passed since the batch's
//! first row. A batch that ends at a commit carries that commit's end LSN:
//! only there can the engine checkpoint. A keepalive outside a transaction
//! means the server has sent all it has: the reader flushes what is pending
//! and sends [`SourceEvent::Idle`], so the engine knows it has caught up (only
//! then may the wall clock drive its watermarks) and an idle job still
//! advances its slot, letting Postgres recycle WAL.
//!
//! Feedback to Postgres is only what the engine confirms through
//! [`SourceHandle::confirm`], after a checkpoint is durable.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::pgoutput::{self, DecodeError, Message, OldTuple, TableDecoder, PG_EPOCH_OFFSET_MICROS};
use super::RejectedChange;
use crate::change::{format_lsn, parse_lsn, Op, Position};
use crate::sql::plan::SourceTable;
use crate::sql::PostgresCdcOptions;

/// Errors of the postgres-cdc source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("postgres at {target}: {message}")]
    Check { target: String, message: String },
    #[error("failed to connect to postgres at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("replication stream from {target} failed: {message}")]
    Stream { target: String, message: String },
    #[error("table `{table}`: {message}")]
    Decode { table: String, message: String },
    /// The replication slot and the checkpoints disagree about where the job
    /// is; the message says how to recover.
    #[error("{0}")]
    Resume(String),
    #[error("the job reads no postgres-cdc table")]
    NoSource,
}

/// What the reader hands the engine, in stream order.
#[derive(Debug)]
pub enum SourceEvent {
    /// Changes of one source table (index into the plan's sources).
    /// `commit_end` is set when the batch ends exactly at a commit.
    Changes {
        source: usize,
        batch: RecordBatch,
        /// Old images of the batch's updates (tables with `REPLICA IDENTITY
        /// FULL`), with the updates' positions: windows retract them.
        before: Option<RecordBatch>,
        /// Changes among the batch's that could not be decoded, in order.
        rejected: Vec<RejectedChange>,
        commit_end: Option<u64>,
    },
    /// No transaction is open and every commit before `lsn` has been delivered.
    Idle { lsn: u64 },
    /// The table was truncated at this point of the stream.
    Truncated { source: usize, commit_lsn: u64 },
    /// The stream reached the requested end LSN; nothing follows.
    End { lsn: u64 },
}

/// Batching knobs of the reader.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    pub max_batch_rows: usize,
    pub linger: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch_rows: 8192,
            linger: Duration::from_millis(20),
        }
    }
}

/// Connection settings parsed from a `postgres://` URL.
#[derive(Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
    require_tls: bool,
}

impl std::fmt::Display for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.port, self.database)
    }
}

impl PgTarget {
    pub fn parse(url: &str) -> Result<PgTarget, SourceError> {
        let config = tokio_postgres::Config::from_str(url).map_err(|e| SourceError::Connect {
            target: "<connection string>".into(),
            message: format!("invalid connection string: {e}"),
        })?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_string();
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = config.get_dbname().unwrap_or(&user).to_string();
        let require_tls = matches!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        Ok(PgTarget {
            config,
            host,
            port,
            user,
            password,
            database,
            require_tls,
        })
    }

    /// A normal (control) connection with deterministic text output.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, SourceError> {
        if self.require_tls {
            return Err(SourceError::Connect {
                target: self.to_string(),
                message: "sslmode=require is not supported for the control connection yet; use a local or tunnelled connection".into(),
            });
        }
        let (client, connection) =
            self.config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| SourceError::Connect {
                    target: self.to_string(),
                    message: e.to_string(),
                })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "postgres control connection closed");
            }
        });
        let settings: String = pgoutput::SESSION_SETTINGS
            .iter()
            .map(|(name, value)| format!("SET {name} = '{value}'; "))
            .collect();
        client
            .batch_execute(&settings)
            .await
            .map_err(|e| self.check(format!("failed to configure the session: {e}")))?;
        Ok(client)
    }

    fn replication_config(&self, slot: &str, publication: &str) -> ReplicationConfig {
        let tls = if self.require_tls {
            TlsConfig::require()
        } else {
            TlsConfig::disabled()
        };
        ReplicationConfig::new(
            &self.host,
            &self.user,
            &self.password,
            &self.database,
            slot,
            publication,
        )
        .with_port(self.port)
        .with_tls(tls)
        .with_options(
            pgoutput::SESSION_SETTINGS
                .iter()
                .map(|(name, value)| format!("-c {name}={value}"))
                .collect::<Vec<_>>()
                .join(" "),
        )
        .with_application_name(format!("engage:{slot}"))
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1))
    }

    fn check(&self, message: String) -> SourceError {
        SourceError::Check {
            target: self.to_string(),
            message,
        }
    }
}

/// Slot and publication of a job.
#[derive(Debug, Clone)]
pub struct SlotNames {
    pub slot: String,
    pub publication: String,
}

impl SlotNames {
    /// From the tables' options, defaulting to `engage_<job>`.
    pub fn for_job(job: &str, sources: &[SourceTable]) -> SlotNames {
        let default = format!(
            "engage_{}",
            job.chars()
                .map(|c| if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                })
                .collect::<String>()
        );
        let options = sources.iter().filter_map(|s| cdc_options(s));
        let slot = options
            .clone()
            .find_map(|o| o.slot.clone())
            .unwrap_or_else(|| default.clone());
        let publication = options
            .clone()
            .find_map(|o| o.publication.clone())
            .unwrap_or(default);
        SlotNames { slot, publication }
    }
}

pub fn cdc_options(source: &SourceTable) -> Option<&PostgresCdcOptions> {
    source.def.connector.postgres_cdc()
}

fn quoted(schema: &str, table: &str) -> String {
    format!(
        "\"{}\".\"{}\"",
        schema.replace('"', "\"\""),
        table.replace('"', "\"\"")
    )
}

/// Checks the server, role and tables; creates or extends the publication.
/// `windowed[i]` names the windowed queries that source `i` drives: such a
/// table must carry old rows (`REPLICA IDENTITY FULL`).
pub async fn preflight(
    target: &PgTarget,
    client: &tokio_postgres::Client,
    sources: &[SourceTable],
    windowed: &[Vec<String>],
    names: &SlotNames,
) -> Result<(), SourceError> {
    let query = |sql: &'static str| async move {
        client
            .query_one(sql, &[])
            .await
            .map_err(|e| target.check(format!("failed to run `{sql}`: {e}")))
    };
    let wal_level: String = query("SHOW wal_level").await?.get(0);
    if wal_level != "logical" {
        return Err(target.check(format!(
            "wal_level is `{wal_level}`, logical replication needs `logical`: run \
             `ALTER SYSTEM SET wal_level = logical` (or set it in postgresql.conf) and restart postgres"
        )));
    }
    let row = query("SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").await?;
    let (role, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        return Err(target.check(format!(
            "role `{role}` may not start replication: run `ALTER ROLE {role} WITH REPLICATION` as a superuser"
        )));
    }
    for (index, source) in sources.iter().enumerate() {
        let options = cdc_options(source).expect("sources are postgres-cdc tables");
        let name = format!("{}.{}", options.schema, options.table);
        let row = client
            .query_opt(
                "SELECT c.oid, c.relreplident::text, has_table_privilege(c.oid, 'SELECT'),
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&options.schema, &options.table],
            )
            .await
            .map_err(|e| target.check(format!("failed to look up table {name}: {e}")))?
            .ok_or_else(|| target.check(format!("table {name} (source `{}`) does not exist", source.def.name)))?;
        let oid: u32 = row.get(0);
        let identity: String = row.get(1);
        let (can_select, has_primary_key): (bool, bool) = (row.get(2), row.get(3));
        if !can_select {
            return Err(target.check(format!(
                "role `{role}` cannot read {name}: run `GRANT SELECT ON {name} TO {role}`"
            )));
        }
        let fix = format!("run `ALTER TABLE {name} REPLICA IDENTITY FULL`");
        match identity.as_str() {
            "n" => {
                return Err(target.check(format!(
                    "table {name} has REPLICA IDENTITY NOTHING, so its updates and deletes cannot be captured: {fix}"
                )))
            }
            "d" if !has_primary_key => {
                return Err(target.check(format!(
                    "table {name} has no primary key and REPLICA IDENTITY DEFAULT, so its updates and deletes \
                     cannot be captured: add a primary key or {fix}"
                )))
            }
            "d" | "i" => {
                let queries = windowed.get(index).filter(|q| !q.is_empty());
                match queries {
                    Some(_) if options.autoset_full_identity => {
                        let sql = format!("ALTER TABLE {} REPLICA IDENTITY FULL", quoted(&options.schema, &options.table));
                        client.batch_execute(&sql).await.map_err(|e| {
                            target.check(format!(
                                "failed to set REPLICA IDENTITY FULL on {name} (option `replica_identity.autoset`; \
                                 only the table's owner may): {e}. Run `{sql}` as its owner"
                            ))
                        })?;
                        tracing::warn!(
                            table = %name,
                            "set REPLICA IDENTITY FULL on the table (option replica_identity.autoset): its windowed \
                             queries need the old rows of updates and deletes"
                        );
                    }
                    Some(queries) => {
                        let kind = if identity == "d" { "DEFAULT" } else { "USING INDEX" };
                        return Err(target.check(format!(
                            "table {name} has REPLICA IDENTITY {kind}: its deletes carry only the key and its updates \
                             no old row, so the windowed queries it drives ({}) could not take back what a changed \
                             or deleted row added, and would over-count. Run `ALTER TABLE {name} REPLICA IDENTITY \
                             FULL` (or set 'replica_identity.autoset' = 'full' in the WITH options of `{}` to let \
                             engage run it where its role owns the table)",
                            queries.join(", "),
                            source.def.name
                        )));
                    }
                    None => tracing::info!(
                        table = %name,
                        "deletes of this table carry only its key and unchanged large values of updates are unknown; \
                         REPLICA IDENTITY FULL gives whole rows"
                    ),
                }
            }
            _ => {}
        }
        let columns: Vec<String> = client
            .query("SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped", &[&oid])
            .await
            .map_err(|e| target.check(format!("failed to read the columns of {name}: {e}")))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for field in source.declared.fields() {
            if !columns.iter().any(|c| c == field.name()) {
                return Err(target.check(format!(
                    "table {name} has no column `{}` (declared in the job's `{}`); its columns: {}",
                    field.name(),
                    source.def.name,
                    columns.join(", ")
                )));
            }
        }
    }
    ensure_publication(target, client, sources, names).await
}

async fn ensure_publication(
    target: &PgTarget,
    client: &tokio_postgres::Client,
    sources: &[SourceTable],
    names: &SlotNames,
) -> Result<(), SourceError> {
    let tables: Vec<(String, String)> = sources
        .iter()
        .filter_map(cdc_options)
        .map(|o| (o.schema.clone(), o.table.clone()))
        .collect();
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&names.publication],
        )
        .await
        .map_err(|e| {
            target.check(format!(
                "failed to look up publication {}: {e}",
                names.publication
            ))
        })?
        .is_some();
    let list = |tables: &[(String, String)]| {
        tables
            .iter()
            .map(|(s, t)| quoted(s, t))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sql = if !exists {
        format!(
            "CREATE PUBLICATION \"{}\" FOR TABLE {}",
            names.publication,
            list(&tables)
        )
    } else {
        let published: Vec<(String, String)> = client
            .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&names.publication])
            .await
            .map_err(|e| target.check(format!("failed to read publication {}: {e}", names.publication)))?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let missing: Vec<_> = tables
            .iter()
            .filter(|t| !published.contains(t))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        format!(
            "ALTER PUBLICATION \"{}\" ADD TABLE {}",
            names.publication,
            list(&missing)
        )
    };
    client.batch_execute(&sql).await.map_err(|e| {
        target.check(format!(
            "failed to run `{sql}`: {e} (the role needs CREATE on the database and ownership of the tables, \
             or create the publication as a superuser)"
        ))
    })?;
    tracing::info!(publication = %names.publication, "publication ready");
    Ok(())
}

/// The slot as Postgres reports it.
#[derive(Debug, Clone)]
pub struct SlotStatus {
    pub plugin: String,
    pub confirmed_flush_lsn: Option<u64>,
    pub wal_status: Option<String>,
}

pub async fn slot_status(
    target: &PgTarget,
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotStatus>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, confirmed_flush_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| target.check(format!("failed to look up replication slot {slot}: {e}")))?;
    Ok(row.map(|row| SlotStatus {
        plugin: row.get(0),
        confirmed_flush_lsn: row.get::<_, Option<String>>(1).and_then(|t| parse_lsn(&t)),
        wal_status: row.get(2),
    }))
}

/// Bytes of WAL between the server's current position and `lsn`.
pub async fn wal_behind(client: &tokio_postgres::Client, lsn: u64) -> Option<u64> {
    let text = format_lsn(lsn);
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&text],
        )
        .await
        .ok()?;
    row.get::<_, Option<i64>>(0).map(|v| v.max(0) as u64)
}

/// A new slot: created with an exported snapshot that the caller reads
/// before calling [`NewSlot::start`].
pub struct NewSlot {
    client: ReplicationClient,
    pub consistent_lsn: u64,
    pub snapshot: String,
}

impl NewSlot {
    pub async fn create(target: &PgTarget, names: &SlotNames) -> Result<NewSlot, SourceError> {
        let connect_error = |e: pgwire_replication::PgWireError| SourceError::Connect {
            target: target.to_string(),
            message: e.to_string(),
        };
        let mut client = ReplicationClient::connect_gated(
            target.replication_config(&names.slot, &names.publication),
        )
        .await
        .map_err(connect_error)?;
        let rows = client
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT \"{}\" LOGICAL pgoutput EXPORT_SNAPSHOT",
                names.slot
            ))
            .await
            .map_err(|e| {
                target.check(format!(
                    "failed to create replication slot {}: {e}",
                    names.slot
                ))
            })?;
        let text = |column: usize| {
            rows.first()
                .and_then(|row| row.get(column).cloned().flatten())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        };
        let consistent_lsn = text(1).and_then(|t| parse_lsn(&t)).ok_or_else(|| {
            target.check("CREATE_REPLICATION_SLOT returned no consistent point".into())
        })?;
        let snapshot = text(2)
            .ok_or_else(|| target.check("CREATE_REPLICATION_SLOT returned no snapshot".into()))?;
        tracing::info!(slot = %names.slot, lsn = %format_lsn(consistent_lsn), "replication slot created");
        Ok(NewSlot {
            client,
            consistent_lsn,
            snapshot,
        })
    }
}

/// The running reader: its events, and the way to confirm positions.
pub struct SourceHandle {
    pub events: mpsc::Receiver<Result<SourceEvent, SourceError>>,
    confirmed: Arc<AtomicU64>,
    /// The server's WAL end as last reported (for lag figures).
    pub server_wal_end: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl SourceHandle {
    /// Lets the slot forget everything up to `lsn` (call after a durable checkpoint).
    pub fn confirm(&self, lsn: u64) {
        self.confirmed.fetch_max(lsn, Ordering::SeqCst);
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for SourceHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts streaming: on a freshly created slot, or resuming at `resume_lsn`.
pub async fn start(
    target: &PgTarget,
    names: &SlotNames,
    sources: &[SourceTable],
    new_slot: Option<NewSlot>,
    resume_lsn: u64,
    end_lsn: Option<u64>,
    batching: BatchOptions,
) -> Result<SourceHandle, SourceError> {
    let connect_error = |e: pgwire_replication::PgWireError| SourceError::Connect {
        target: target.to_string(),
        message: e.to_string(),
    };
    let client = match new_slot {
        Some(mut slot) => {
            slot.client.start().await.map_err(connect_error)?;
            slot.client
        }
        None => {
            let config = target
                .replication_config(&names.slot, &names.publication)
                .with_start_lsn(Lsn(resume_lsn))
                .with_ack_lsn(Lsn(resume_lsn));
            ReplicationClient::connect(config)
                .await
                .map_err(connect_error)?
        }
    };
    let mut client = client;
    client
        .wait_started()
        .await
        .map_err(|e| SourceError::Stream {
            target: target.to_string(),
            message: format!("START_REPLICATION on slot {} was refused: {e}", names.slot),
        })?;
    let mut decoders = Vec::new();
    let mut before_decoders = Vec::new();
    for source in sources {
        before_decoders.push(
            TableDecoder::new(&source.def.name, source.declared.clone()).map_err(|e| {
                SourceError::Decode {
                    table: source.def.name.clone(),
                    message: e.to_string(),
                }
            })?,
        );
        decoders.push(
            TableDecoder::new(&source.def.name, source.declared.clone()).map_err(|e| {
                SourceError::Decode {
                    table: source.def.name.clone(),
                    message: e.to_string(),
                }
            })?,
        );
    }
    let (sender, events) = mpsc::channel(8);
    let confirmed = Arc::new(AtomicU64::new(resume_lsn));
    let server_wal_end = Arc::new(AtomicU64::new(resume_lsn));
    let reader = Reader {
        target: target.to_string(),
        client,
        sender,
        tables: sources
            .iter()
            .map(|s| {
                let o = cdc_options(s).expect("cdc source");
                (o.schema.clone(), o.table.clone())
            })
            .collect(),
        rejected: vec![Vec::new(); decoders.len()],
        decoders,
        before_decoders,
        relations: HashMap::new(),
        batching,
        confirmed: confirmed.clone(),
        acknowledged: resume_lsn,
        server_wal_end: server_wal_end.clone(),
        pending: None,
        pending_since: None,
        pending_complete: false,
        in_transaction: false,
        commit_lsn: 0,
        commit_time: 0,
        seq: 0,
        last_commit_end: resume_lsn,
        last_idle: Instant::now(),
        idle_sent: resume_lsn,
        sent_since_idle: false,
        end_lsn,
    };
    let task = tokio::spawn(reader.run());
    Ok(SourceHandle {
        events,
        confirmed,
        server_wal_end,
        task,
    })
}

/// The reader task's state.
struct Reader {
    target: String,
    client: ReplicationClient,
    sender: mpsc::Sender<Result<SourceEvent, SourceError>>,
    /// (schema, table) of each source, by source index.
    tables: Vec<(String, String)>,
    decoders: Vec<TableDecoder>,
    /// Old images of updates, per source (see [`SourceEvent::Changes`]).
    before_decoders: Vec<TableDecoder>,
    /// Changes that could not be decoded, per source, not sent yet.
    rejected: Vec<Vec<RejectedChange>>,
    /// Relation id -> source index.
    relations: HashMap<u32, usize>,
    batching: BatchOptions,
    confirmed: Arc<AtomicU64>,
    acknowledged: u64,
    server_wal_end: Arc<AtomicU64>,
    /// Source index whose decoder holds unsent rows.
    pending: Option<usize>,
    pending_since: Option<Instant>,
    /// The pending rows all belong to committed transactions.
    pending_complete: bool,
    in_transaction: bool,
    commit_lsn: u64,
    commit_time: i64,
    seq: u64,
    last_commit_end: u64,
    last_idle: Instant,
    idle_sent: u64,
    /// A batch went out since the last [`SourceEvent::Idle`].
    sent_since_idle: bool,
    /// Stop once the stream reaches this LSN (like pg_recvlogical's --endpos).
    end_lsn: Option<u64>,
}

enum Next {
    Continue,
    Stop,
}

impl Reader {
    async fn run(mut self) {
        loop {
            match self.step().await {
                Ok(Next::Continue) => {}
                Ok(Next::Stop) => return,
                Err(error) => {
                    let _ = self.sender.send(Err(error)).await;
                    return;
                }
            }
        }
    }

    async fn step(&mut self) -> Result<Next, SourceError> {
        let confirmed = self.confirmed.load(Ordering::SeqCst);
        if confirmed > self.acknowledged {
            self.client.update_applied_lsn(Lsn(confirmed));
            self.acknowledged = confirmed;
        }
        let wait = match self.pending_since {
            Some(since) if !self.in_transaction => {
                self.batching.linger.saturating_sub(since.elapsed())
            }
            _ => Duration::from_millis(500),
        };
        let event = match tokio::time::timeout(wait, self.client.recv()).await {
            Err(_) => {
                if !self.in_transaction && self.pending.is_some() {
                    return self.flush().await;
                }
                return Ok(Next::Continue);
            }
            Ok(Err(e)) => return Err(self.stream_error(e.to_string())),
            Ok(Ok(None)) => {
                return Err(self.stream_error("the server ended the replication stream".into()))
            }
            Ok(Ok(Some(event))) => event,
        };
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                if self.end_lsn.is_some_and(|end| final_lsn.0 >= end) {
                    return self.end(final_lsn.0).await;
                }
                self.in_transaction = true;
                self.commit_lsn = final_lsn.0;
                self.commit_time = commit_time_micros;
                self.seq = 0;
            }
            ReplicationEvent::XLogData { data, .. } => return self.change(&data).await,
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.last_commit_end = end_lsn.0;
                self.pending_complete = self.pending.is_some();
                let due = self
                    .pending_since
                    .is_some_and(|since| since.elapsed() >= self.batching.linger);
                // Cut at a commit once half a batch is pending, so batches end
                // on transaction boundaries (where checkpoints can happen) even
                // under a backlog; only one huge transaction is cut inside.
                let full = self.pending_rows() >= self.batching.max_batch_rows / 2;
                if self.end_lsn.is_some_and(|end| end_lsn.0 >= end) {
                    return self.end(end_lsn.0).await;
                }
                if self.pending.is_some() && (due || full) {
                    return self.flush().await;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.server_wal_end.fetch_max(wal_end.0, Ordering::Relaxed);
                if !self.in_transaction && self.end_lsn.is_some_and(|end| wal_end.0 >= end) {
                    return self.end(wal_end.0).await;
                }
                let idle_lsn = wal_end.0.max(self.last_commit_end);
                if !self.in_transaction {
                    // The server has sent all it has: no reason to linger,
                    // and the engine learns at once that it has caught up.
                    if self.pending.is_some() {
                        self.flush().await?;
                    }
                    if self.sent_since_idle
                        || (idle_lsn > self.idle_sent
                            && self.last_idle.elapsed() >= Duration::from_millis(500))
                    {
                        self.idle_sent = self.idle_sent.max(idle_lsn);
                        self.last_idle = Instant::now();
                        self.sent_since_idle = false;
                        return self
                            .send(SourceEvent::Idle {
                                lsn: self.idle_sent,
                            })
                            .await;
                    }
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => return Ok(Next::Stop),
        }
        Ok(Next::Continue)
    }

    fn pending_rows(&self) -> usize {
        self.pending
            .map(|i| self.decoders[i].len() + self.rejected[i].len())
            .unwrap_or(0)
    }

    fn decode_error(&self, source: usize, error: DecodeError) -> SourceError {
        SourceError::Decode {
            table: self.tables[source].1.clone(),
            message: error.to_string(),
        }
    }

    async fn change(&mut self, data: &[u8]) -> Result<Next, SourceError> {
        let message = pgoutput::decode(data)
            .map_err(|e| self.stream_error(format!("undecodable pgoutput message: {e}")))?;
        let (relation_id, op) = match &message {
            Message::Relation(relation) => {
                let index = self.tables.iter().position(|(schema, table)| {
                    *schema == relation.namespace && *table == relation.name
                });
                if let Some(index) = index {
                    if self.pending == Some(index) {
                        self.flush().await?;
                    }
                    for decoder in [&mut self.decoders[index], &mut self.before_decoders[index]] {
                        decoder
                            .set_relation(relation)
                            .map_err(|e| SourceError::Decode {
                                table: format!("{}.{}", relation.namespace, relation.name),
                                message: format!("schema change: {e}"),
                            })?;
                    }
                    self.relations.insert(relation.id, index);
                }
                return Ok(Next::Continue);
            }
            Message::Insert { relation_id, .. } => (*relation_id, Op::Insert),
            Message::Update { relation_id, .. } => (*relation_id, Op::Update),
            Message::Delete { relation_id, .. } => (*relation_id, Op::Delete),
            Message::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    if let Some(&source) = self.relations.get(id) {
                        if self.pending.is_some() {
                            self.flush().await?;
                        }
                        self.send(SourceEvent::Truncated {
                            source,
                            commit_lsn: self.commit_lsn,
                        })
                        .await?;
                    }
                }
                return Ok(Next::Continue);
            }
            Message::Other(_) => return Ok(Next::Continue),
        };
        let Some(&source) = self.relations.get(&relation_id) else {
            // A table of the publication that this job does not read.
            return Ok(Next::Continue);
        };
        if self.pending.is_some_and(|p| p != source) {
            self.flush().await?;
        }
        let position = Position::new(self.commit_lsn, self.seq);
        self.seq += 1;
        // The row a dead letter keeps: the new one, or a delete's old one.
        let (result, row) = match &message {
            Message::Insert { new, .. } => (
                self.decoders[source].append(op, new, None, position, self.commit_time),
                new,
            ),
            Message::Update { old, new, .. } => {
                // Both decoders take the update, or neither does.
                let full = match old {
                    Some(OldTuple::Full(before)) => Some(before),
                    _ => None,
                };
                let checked = match full {
                    Some(before) => self.before_decoders[source].check(before, None, position),
                    None => Ok(()),
                };
                let old = old.as_ref().map(|o| match o {
                    OldTuple::Key(t) | OldTuple::Full(t) => t,
                });
                let result = checked.and_then(|()| {
                    self.decoders[source].append(op, new, old, position, self.commit_time)
                });
                if let (Ok(()), Some(before)) = (&result, full) {
                    self.before_decoders[source]
                        .append(op, before, None, position, self.commit_time)
                        .map_err(|e| self.decode_error(source, e))?;
                }
                (result, new)
            }
            Message::Delete { old, .. } => {
                let (OldTuple::Key(tuple) | OldTuple::Full(tuple)) = old;
                (
                    self.decoders[source].append(op, tuple, None, position, self.commit_time),
                    tuple,
                )
            }
            _ => unreachable!("handled above"),
        };
        if let Err(error) = result {
            let commit_ts = self.commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS);
            let rejected = self.decoders[source]
                .reject(error, row, position, commit_ts)
                .map_err(|error| self.decode_error(source, error))?;
            self.rejected[source].push(rejected);
        }
        self.pending_complete = false;
        if self.pending.is_none() {
            self.pending = Some(source);
            self.pending_since = Some(Instant::now());
        }
        if self.pending_rows() >= self.batching.max_batch_rows {
            return self.flush().await;
        }
        Ok(Next::Continue)
    }

    /// Sends what is pending, then [`SourceEvent::End`], and stops reading.
    async fn end(&mut self, lsn: u64) -> Result<Next, SourceError> {
        self.flush().await?;
        self.send(SourceEvent::End { lsn }).await?;
        Ok(Next::Stop)
    }

    /// Sends the pending batch; it carries the last commit's end LSN when no
    /// row of an unfinished transaction is in it.
    async fn flush(&mut self) -> Result<Next, SourceError> {
        let Some(source) = self.pending.take() else {
            return Ok(Next::Continue);
        };
        self.pending_since = None;
        let commit_end = self.pending_complete.then_some(self.last_commit_end);
        self.pending_complete = false;
        let batch = self.decoders[source].finish();
        let before = (!self.before_decoders[source].is_empty())
            .then(|| self.before_decoders[source].finish());
        let rejected = std::mem::take(&mut self.rejected[source]);
        self.sent_since_idle = true;
        self.send(SourceEvent::Changes {
            source,
            batch,
            before,
            rejected,
            commit_end,
        })
        .await
    }

    async fn send(&mut self, event: SourceEvent) -> Result<Next, SourceError> {
        match self.sender.send(Ok(event)).await {
            Ok(()) => Ok(Next::Continue),
            Err(_) => Ok(Next::Stop), // the engine is gone
        }
    }

    fn stream_error(&self, message: String) -> SourceError {
        // The walsender converts text to the client's UTF-8 and fails on a
        // value that is not valid in the database's encoding (a SQL_ASCII
        // database holding other bytes): every restart would fail the same way.
        if message.contains("SQLSTATE 22021") {
            return SourceError::Decode {
                table: format!("(a table of {})", self.target),
                message: format!(
                    "postgres cannot stream a changed row as UTF-8 ({message}): the database holds text that is \
                     not valid UTF-8 (a SQL_ASCII database?), and no restart can get past it. Correct such text \
                     in the source tables so later changes stream; to go on, advance the slot past the failing \
                     transaction with pg_replication_slot_advance (its changes are then lost to every sink), or \
                     start the job over from a fresh snapshot"
                ),
            };
        }
        SourceError::Stream {
            target: self.target.clone(),
            message,
        }
    }
}

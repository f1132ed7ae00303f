//! What the `postgres-cdc` connector needs of the database before it
//! streams: where to connect, the checks, the publication and the slot.
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

use std::str::FromStr;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig};

use super::pgoutput;
use super::replication::SourceError;
use super::tls::{self, PgTls, SslMode};
use crate::change::{format_lsn, parse_lsn};
use crate::sql::plan::SourceTable;
use crate::sql::PostgresCdcOptions;

/// Connection settings parsed from a `postgres://` URL.
#[derive(Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
    tls: PgTls,
}

impl std::fmt::Display for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.port, self.database)
    }
}

impl PgTarget {
    pub fn parse(url: &str) -> Result<PgTarget, SourceError> {
        let invalid = |message: String| SourceError::Connect {
            target: "<connection string>".into(),
            message,
        };
        let (url, tls) = PgTls::split(url).map_err(invalid)?;
        let mut config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| invalid(format!("invalid connection string: {e}")))?;
        config.ssl_mode(tls.tokio_postgres_mode());
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
        Ok(PgTarget {
            config,
            host,
            port,
            user,
            password,
            database,
            tls,
        })
    }

    /// A normal (control) connection with deterministic text output.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, SourceError> {
        let failed = |message: String| SourceError::Connect {
            target: self.to_string(),
            message,
        };
        let closed = |error: tokio_postgres::Error| {
            tracing::debug!(error = %error, "postgres control connection closed");
        };
        let client = if self.tls.mode == SslMode::Disable {
            let (client, connection) = self
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| failed(e.to_string()))?;
            tokio::spawn(async move { connection.await.map_err(closed) });
            client
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
                self.tls.client_config().map_err(failed)?,
            );
            let (client, connection) = self.config.connect(tls).await.map_err(|e| {
                let message = error_chain(&e);
                let hint = tls::hint(&self.tls, &message);
                failed(format!("{message}{hint}"))
            })?;
            tokio::spawn(async move { connection.await.map_err(closed) });
            client
        };
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

    pub(super) fn replication_config(&self, slot: &str, publication: &str) -> ReplicationConfig {
        let tls = self.tls.replication();
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

pub fn quoted(schema: &str, table: &str) -> String {
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
/// before streaming from it ([`super::replication::start`]).
pub struct NewSlot {
    pub(super) client: ReplicationClient,
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

/// An error and its causes, each once: `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

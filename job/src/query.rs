//! `engage query`: DataFusion SQL over a job's filesystem sinks.
//!
//! Each `filesystem` sink table of the job SQL is registered under its table
//! name as a Parquet listing table over its committed files (staged files are
//! named `*.staged` and never match). A time pattern of the form
//! `name=%...` becomes a partition column `name`, as Hive, BigQuery and
//! `datafusion-cli` read it.

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::sql::{self, JobSpec};

/// Output formats of `engage query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Sql(#[from] sql::SqlError),
    #[error("{0}")]
    Query(String),
}

/// Parses a job script only for its filesystem sinks: variables other than
/// `ENGAGE_DATA_DIR` need not be set to query outputs, so missing ones get
/// placeholders of the right scheme.
pub fn parse_for_outputs(job: &str, script: &str) -> Result<JobSpec, sql::SqlError> {
    sql::parse_job(job, script, &|name| {
        std::env::var(name).ok().or_else(|| placeholder(name))
    })
}

/// [`parse_for_outputs`] for the outputs of a job run with
/// `ENGAGE_DATA_DIR=data_dir` (the benchmark's and the fault suite's jobs),
/// whatever this process' environment holds.
pub fn parse_outputs_under(
    job: &str,
    script: &str,
    data_dir: &std::path::Path,
) -> Result<JobSpec, sql::SqlError> {
    let data_dir = data_dir.display().to_string();
    sql::parse_job(job, script, &|name| match name {
        "ENGAGE_DATA_DIR" => Some(data_dir.clone()),
        _ => placeholder(name),
    })
}

/// A value of the right scheme for a variable that only connections use
/// (`ENGAGE_DATA_DIR` has its own default).
fn placeholder(name: &str) -> Option<String> {
    if name == "ENGAGE_DATA_DIR" {
        None
    } else if name.contains("REDIS") {
        Some("redis://unset".into())
    } else if name.contains("POSTGRES") || name.contains("DATABASE") {
        Some("postgres://unset/unset".into())
    } else if name.ends_with("_URL") {
        Some("http://unset.invalid/".into())
    } else if name.contains("SECRET") {
        // A well-formed Standard Webhooks secret (32 zero bytes).
        Some("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into())
    } else {
        Some(format!("unset-{name}"))
    }
}

/// Registers the job's filesystem sinks in a new session. Tables without
/// committed files are reported in the second value.
pub async fn session_for(spec: &JobSpec) -> (SessionContext, Vec<String>) {
    let ctx = SessionContext::new();
    let mut unavailable = Vec::new();
    for table in &spec.tables {
        let Some(options) = table.connector.filesystem() else {
            continue;
        };
        let mut read = ParquetReadOptions::default();
        let partition: Vec<(String, DataType)> = options
            .time_pattern
            .as_deref()
            .and_then(|p| p.split_once('='))
            .filter(|(name, _)| !name.contains('%') && !name.contains('/'))
            .map(|(name, _)| vec![(name.to_string(), DataType::Utf8)])
            .unwrap_or_default();
        read = read.table_partition_cols(partition);
        let path = if options.path.contains("://") {
            options.path.clone()
        } else {
            match std::fs::canonicalize(&options.path) {
                Ok(path) => format!("{}/", path.display()),
                Err(_) => {
                    unavailable.push(format!(
                        "`{}`: {} does not exist yet",
                        table.name, options.path
                    ));
                    continue;
                }
            }
        };
        if let Err(error) = ctx.register_parquet(table.name.as_str(), &path, read).await {
            unavailable.push(format!("`{}` at {}: {error}", table.name, options.path));
        }
    }
    (ctx, unavailable)
}

/// Runs `query` and renders the result.
pub async fn run(spec: &JobSpec, query: &str, format: OutputFormat) -> Result<String, QueryError> {
    let (ctx, unavailable) = session_for(spec).await;
    let frame = ctx.sql(query).await.map_err(|e| {
        let mut message = e.to_string();
        if !unavailable.is_empty() {
            message.push_str(&format!("\nnot queryable yet: {}", unavailable.join("; ")));
        }
        let names: Vec<_> = spec
            .tables
            .iter()
            .filter(|t| t.connector.filesystem().is_some())
            .map(|t| t.name.as_str())
            .collect();
        message.push_str(&format!("\ntables: {}", names.join(", ")));
        QueryError::Query(message)
    })?;
    let batches = frame
        .collect()
        .await
        .map_err(|e| QueryError::Query(e.to_string()))?;
    render(&batches, format)
}

pub fn render(batches: &[RecordBatch], format: OutputFormat) -> Result<String, QueryError> {
    let error = |e: arrow::error::ArrowError| QueryError::Query(e.to_string());
    Ok(match format {
        OutputFormat::Table => pretty_format_batches(batches).map_err(error)?.to_string(),
        OutputFormat::Csv => {
            let mut out = Vec::new();
            {
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                for batch in batches {
                    let flat = crate::values::flat_batch(batch).map_err(error)?;
                    writer.write(&flat).map_err(error)?;
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        }
        OutputFormat::Json => {
            let mut out = Vec::new();
            {
                let mut writer = crate::values::json_writer(&mut out);
                for batch in batches {
                    writer.write(batch).map_err(error)?;
                }
                writer.finish().map_err(error)?;
            }
            String::from_utf8_lossy(&out).into_owned()
        }
    })
}

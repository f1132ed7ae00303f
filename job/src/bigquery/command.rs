//! `engage bigquery schema` and `engage bigquery load`.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use serde_json::Value;

use super::{by_epoch, BigQuery, LoadError, Loaded};
use crate::sql::options::FilesystemOptions;
use crate::sql::plan::JobPlan;
use crate::sql::JobSpec;

/// The BigQuery schema of filesystem sink `table`'s files (JSON, as
/// `bq mk --table` takes it).
pub async fn schema(spec: &JobSpec, table: &str) -> Result<Value, String> {
    let options = filesystem(spec, table)?;
    let plan = JobPlan::new(spec).await.map_err(|e| e.to_string())?;
    let query = plan
        .queries
        .iter()
        .find(|q| plan.sinks[q.sink].def.name == table)
        .ok_or_else(|| format!("no INSERT writes `{table}`: it has no schema of its own"))?;
    let parquet = crate::values::parquet_schema(&query.output_schema);
    super::schema::table_schema(&parquet, options.time_pattern.as_deref())
}

/// What `engage bigquery load` did.
#[derive(Debug, Default)]
pub struct LoadSummary {
    pub epochs: usize,
    pub loaded_now: usize,
    pub loaded_before: usize,
    pub rows: u64,
    pub failed: Vec<String>,
}

/// Submits a load job for every epoch of committed files of the job's
/// filesystem sinks with `bigquery.table` (or of `table` alone) that no job
/// has loaded, with the same job ids as the running job. `since`
/// (`YYYY-MM-DD`) keeps the files of partitions from that day on (of a
/// sink partitioned by day). `tick` is called after each epoch with
/// (done, total).
pub async fn load(
    spec: &JobSpec,
    table: Option<&str>,
    since: Option<&str>,
    mut tick: impl FnMut(usize, usize),
) -> Result<LoadSummary, String> {
    let sinks: Vec<(&str, &FilesystemOptions)> = spec
        .tables
        .iter()
        .filter(|t| table.is_none_or(|name| t.name == name))
        .filter_map(|t| Some((t.name.as_str(), t.connector.filesystem()?)))
        .filter(|(_, options)| options.bigquery.is_some())
        .collect();
    if sinks.is_empty() {
        return Err(match table {
            Some(name) => format!(
                "`{name}` is not a filesystem sink with `bigquery.table` in {}",
                spec.name
            ),
            None => format!(
                "job `{}` has no filesystem sink with `bigquery.table`; add the option to the sink's WITH (...)",
                spec.name
            ),
        });
    }
    let mut summary = LoadSummary::default();
    let mut totals = Vec::new();
    let mut plans = Vec::new();
    for (name, options) in &sinks {
        let epochs = epochs_on_disk(options, since).await?;
        totals.push(epochs.len());
        plans.push((name, options, epochs));
    }
    let total: usize = totals.iter().sum();
    let mut done = 0;
    for (name, options, epochs) in plans {
        let client = BigQuery::new(options)?.expect("the sink has bigquery options");
        let part = load_epochs(&client, &spec.name, name, epochs, |_, _| {
            done += 1;
            tick(done, total);
        })
        .await;
        summary.add(part);
    }
    Ok(summary)
}

/// The committed files of a sink by epoch, of partitions from `since` on.
pub async fn epochs_on_disk(
    options: &FilesystemOptions,
    since: Option<&str>,
) -> Result<BTreeMap<u64, Vec<String>>, String> {
    let files = committed_files(options)
        .await?
        .into_iter()
        .filter(|f| since.is_none_or(|day| partition_day(f).is_none_or(|d| d >= day)));
    Ok(by_epoch(files))
}

/// Loads each epoch's files in turn (skipping those a job loaded); `done`
/// hears of each epoch and whether it is loaded now.
pub async fn load_epochs(
    client: &BigQuery,
    job: &str,
    sink: &str,
    epochs: BTreeMap<u64, Vec<String>>,
    mut done: impl FnMut(u64, bool),
) -> LoadSummary {
    let mut summary = LoadSummary {
        epochs: epochs.len(),
        ..LoadSummary::default()
    };
    for (epoch, files) in epochs {
        let result = client.load_epoch(job, sink, epoch, &files).await;
        done(epoch, result.is_ok());
        match result {
            Ok(Loaded::Now { rows, .. }) => {
                summary.loaded_now += 1;
                summary.rows += rows;
            }
            Ok(Loaded::Before { .. }) => summary.loaded_before += 1,
            Err(LoadError::Transient(message) | LoadError::Refused(message)) => summary
                .failed
                .push(format!("{sink} epoch {epoch}: {message}")),
        }
    }
    summary
}

impl LoadSummary {
    fn add(&mut self, other: LoadSummary) {
        self.epochs += other.epochs;
        self.loaded_now += other.loaded_now;
        self.loaded_before += other.loaded_before;
        self.rows += other.rows;
        self.failed.extend(other.failed);
    }
}

/// `engage bigquery load`: [`load`] with a progress bar and a summary; an
/// error when a load failed (after listing them).
pub async fn load_with_progress(
    spec: &JobSpec,
    table: Option<&str>,
    since: Option<&str>,
) -> Result<(), String> {
    if let Some(day) = since {
        chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
            .map_err(|_| format!("--since {day}: give a day as YYYY-MM-DD"))?;
    }
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} checkpoints' files ({elapsed})",
        )
        .expect("valid template"),
    );
    let started = std::time::Instant::now();
    let summary = load(spec, table, since, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .await?;
    bar.finish_and_clear();
    println!(
        "{} checkpoints' files: {} loaded now ({} rows), {} loaded before, {} failed, in {:.1} s",
        summary.epochs,
        summary.loaded_now,
        summary.rows,
        summary.loaded_before,
        summary.failed.len(),
        started.elapsed().as_secs_f64()
    );
    for failure in &summary.failed {
        eprintln!("failed: {failure}");
    }
    if summary.failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} load jobs failed (above); fix the cause and run this again",
            summary.failed.len()
        ))
    }
}

fn filesystem<'a>(spec: &'a JobSpec, table: &str) -> Result<&'a FilesystemOptions, String> {
    spec.tables
        .iter()
        .find(|t| t.name == table)
        .and_then(|t| t.connector.filesystem())
        .ok_or_else(|| format!("`{table}` is not a filesystem sink of job `{}`", spec.name))
}

/// The committed Parquet files under a sink's path, relative to it (staged
/// files excluded).
pub async fn committed_files(options: &FilesystemOptions) -> Result<Vec<String>, String> {
    let location = crate::storage::resolve(&options.path)?;
    let listed: Vec<object_store::ObjectMeta> = location
        .store
        .list(Some(&location.prefix))
        .try_collect()
        .await
        .map_err(|e| format!("failed to list {}: {e}", location.display))?;
    let prefix = location.prefix.as_ref();
    let mut files: Vec<String> = listed
        .into_iter()
        .map(|meta| meta.location.as_ref().to_string())
        .map(|path| {
            path.strip_prefix(prefix)
                .map(|rest| rest.trim_start_matches('/').to_string())
                .unwrap_or(path)
        })
        .filter(|path| path.ends_with(".parquet") && !path.starts_with('_'))
        .collect();
    files.sort();
    Ok(files)
}

/// `2026-12-01` of `event_date=2026-12-01/part-...`.
fn partition_day(file: &str) -> Option<&str> {
    let (dir, _) = file.rsplit_once('/')?;
    let value = dir.rsplit('/').next()?.split_once('=')?.1;
    (value.len() == 10).then_some(value)
}

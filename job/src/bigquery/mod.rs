//! BigQuery load jobs for what a `filesystem` sink commits.
//!
//! Each checkpoint publishes a set of Parquet files, all named
//! `part-<epoch>-...`. One load job per (sink, epoch) appends exactly those
//! files (`sourceFormat = PARQUET`, `WRITE_APPEND`, hive partitioning from
//! the sink's partition pattern), under a **job id derived from job, sink
//! and epoch**: `engage_<job>_<sink>_<epoch>`. Before submitting, engage
//! asks for that job: if it exists and succeeded, the epoch is loaded
//! already (a replayed or repeated submission loads nothing twice); if it
//! failed, the next attempt goes under `..._2`, `..._3` (BigQuery never
//! reuses a job id; a refused load, say a missing table, is attempted again
//! at the next start or `engage bigquery load`, a transient failure at
//! once). A submission BigQuery answers with 409 (the id exists)
//! is looked up the same way.
//!
//! Loads run beside the stream, never in its way: after a checkpoint
//! commits, its files are submitted on a task of their own; a failure is
//! logged with BigQuery's message. Each checkpoint records up to which
//! epoch everything is loaded and which later epochs are not
//! ([`LoadProgress`]); the sink's next start loads those (and any later
//! epoch on disk), as `engage bigquery load` does by hand.

mod auth;
pub mod command;
pub mod schema;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::sql::options::{BigQueryOptions, FilesystemOptions};

const API: &str = "https://bigquery.googleapis.com";
/// Job ids per epoch (`..._2` and on): each failed attempt uses one up.
const ATTEMPTS: u32 = 50;

/// Why a load did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Worth retrying later: the network, a 5xx, BigQuery's backend errors.
    #[error("{0}")]
    Transient(String),
    /// BigQuery refused it (schema, permissions, a missing table).
    #[error("{0}")]
    Refused(String),
}

/// How a load ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// This call's job loaded the files.
    Now { job_id: String, rows: u64 },
    /// A job with the epoch's id had loaded them before.
    Before { job_id: String },
}

/// A BigQuery client for one sink's table.
pub struct BigQuery {
    http: reqwest::Client,
    options: BigQueryOptions,
    /// `https://bigquery.googleapis.com`, or the `bigquery.endpoint`.
    base: String,
    auth: Option<auth::Auth>,
    /// Whether the sink's files sit in `name=value/` directories.
    hive: bool,
}

impl BigQuery {
    pub fn new(filesystem: &FilesystemOptions) -> Result<Option<BigQuery>, String> {
        let Some(options) = filesystem.bigquery.clone() else {
            return Ok(None);
        };
        let base = options.endpoint.as_ref().map_or(API.to_string(), |e| {
            e.expose().trim_end_matches('/').to_string()
        });
        // An emulator (an endpoint, no key given) takes no credentials.
        let auth = match (&options.credentials, &options.endpoint) {
            (Some(path), _) => Some(auth::Auth::from_key_file(path)?),
            (None, Some(_)) => None,
            (None, None) => Some(auth::Auth::default_credentials()?),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", e.without_url()))?;
        Ok(Some(BigQuery {
            http,
            options,
            base,
            auth,
            hive: filesystem.time_pattern.is_some(),
        }))
    }

    /// `project.dataset.table`, for messages.
    pub fn table(&self) -> String {
        format!(
            "{}.{}.{}",
            self.options.project, self.options.dataset, self.options.table
        )
    }

    /// Loads `files` (paths under the sink's directory) as epoch `epoch` of
    /// sink `sink` of job `job`, unless a job of that epoch loaded them.
    pub async fn load_epoch(
        &self,
        job: &str,
        sink: &str,
        epoch: u64,
        files: &[String],
    ) -> Result<Loaded, LoadError> {
        let base_id = job_id(job, sink, epoch);
        for attempt in 1..=ATTEMPTS {
            let id = if attempt == 1 {
                base_id.clone()
            } else {
                format!("{base_id}_{attempt}")
            };
            let (found, submitted) = match self.get_job(&id).await? {
                Some(found) => (found, false),
                None => match self.insert_job(&id, files).await? {
                    Some(created) => (created, true),
                    // 409: it exists after all (an earlier submission's answer was lost).
                    None => (
                        self.get_job(&id).await?.ok_or_else(|| {
                            LoadError::Transient(format!("load job {id} exists but cannot be read"))
                        })?,
                        false,
                    ),
                },
            };
            let done = self.wait_done(&id, found).await?;
            match error_of(&done) {
                None if submitted => {
                    let rows = done["statistics"]["load"]["outputRows"]
                        .as_str()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    return Ok(Loaded::Now { job_id: id, rows });
                }
                None => return Ok(Loaded::Before { job_id: id }),
                // An earlier attempt's failure: this one goes under the next id.
                Some(_) if !submitted => continue,
                Some((reason, message)) => {
                    let transient = matches!(
                        reason.as_str(),
                        "backendError" | "internalError" | "rateLimitExceeded" | "jobBackendError"
                    );
                    tracing::warn!(job_id = %id, reason = %reason, "bigquery load job failed: {message}");
                    if !transient {
                        return Err(LoadError::Refused(format!(
                            "load job {id} into {} failed ({reason}): {message}",
                            self.table()
                        )));
                    }
                }
            }
        }
        Err(LoadError::Transient(format!(
            "{ATTEMPTS} load jobs for epoch {epoch} of sink `{sink}` failed; run `engage bigquery load` later"
        )))
    }

    async fn request(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, LoadError> {
        let builder = match &self.auth {
            Some(auth) => builder.bearer_auth(auth.token(&self.http).await?),
            None => builder,
        };
        builder.send().await.map_err(|e| {
            LoadError::Transient(format!("bigquery request failed: {}", e.without_url()))
        })
    }

    fn jobs_url(&self) -> String {
        format!(
            "{}/bigquery/v2/projects/{}/jobs",
            self.base, self.options.project
        )
    }

    /// The job `id`, or `None` if BigQuery has none.
    async fn get_job(&self, id: &str) -> Result<Option<Value>, LoadError> {
        let mut request = self.http.get(format!("{}/{id}", self.jobs_url()));
        if let Some(location) = &self.options.location {
            request = request.query(&[("location", location)]);
        }
        let response = self.request(request).await?;
        match response.status().as_u16() {
            404 => Ok(None),
            200 => Ok(Some(json_of(response).await?)),
            status => Err(status_error("looking up load job", status, response).await),
        }
    }

    /// Submits the load job `id`; `None` when BigQuery says it exists (409),
    /// to be looked up instead.
    async fn insert_job(&self, id: &str, files: &[String]) -> Result<Option<Value>, LoadError> {
        let prefix = &self.options.source_uri_prefix;
        let uris: Vec<String> = files.iter().map(|f| format!("{prefix}/{f}")).collect();
        let mut load = json!({
            "sourceUris": uris,
            "sourceFormat": "PARQUET",
            "destinationTable": {
                "projectId": self.options.project,
                "datasetId": self.options.dataset,
                "tableId": self.options.table,
            },
            "writeDisposition": "WRITE_APPEND",
            "createDisposition": "CREATE_IF_NEEDED",
        });
        if self.hive {
            load["hivePartitioningOptions"] = json!({
                "mode": "AUTO",
                "sourceUriPrefix": format!("{prefix}/"),
            });
        }
        let mut reference = json!({"projectId": self.options.project, "jobId": id});
        if let Some(location) = &self.options.location {
            reference["location"] = json!(location);
        }
        let body = json!({"jobReference": reference, "configuration": {"load": load}});
        let response = self
            .request(self.http.post(self.jobs_url()).json(&body))
            .await?;
        match response.status().as_u16() {
            409 => Ok(None),
            200 => Ok(Some(json_of(response).await?)),
            status => Err(status_error("submitting a load job", status, response).await),
        }
    }

    /// Polls job `id` until BigQuery says it is done.
    async fn wait_done(&self, id: &str, mut job: Value) -> Result<Value, LoadError> {
        let mut wait = Duration::from_millis(500);
        while job["status"]["state"] != "DONE" {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
            job = self.get_job(id).await?.ok_or_else(|| {
                LoadError::Transient(format!("load job {id} disappeared while running"))
            })?;
        }
        Ok(job)
    }
}

/// `engage_<job>_<sink>_<epoch>`, with what BigQuery does not allow in a
/// job id (letters, digits, `_`, `-`) turned into `_`.
pub fn job_id(job: &str, sink: &str, epoch: u64) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("engage_{}_{}_{epoch:012}", clean(job), clean(sink))
}

/// Committed files grouped by epoch (paths relative to the sink's directory).
pub fn by_epoch(files: impl IntoIterator<Item = String>) -> BTreeMap<u64, Vec<String>> {
    let mut epochs: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for file in files {
        if let Some(epoch) = crate::sink::parquet::epoch_of(&file) {
            epochs.entry(epoch).or_default().push(file);
        }
    }
    epochs
}

fn error_of(job: &Value) -> Option<(String, String)> {
    let error = job["status"].get("errorResult")?;
    Some((
        error["reason"].as_str().unwrap_or("unknown").to_string(),
        error["message"].as_str().unwrap_or_default().to_string(),
    ))
}

async fn json_of(response: reqwest::Response) -> Result<Value, LoadError> {
    response.json().await.map_err(|e| {
        LoadError::Transient(format!("unreadable bigquery answer: {}", e.without_url()))
    })
}

/// An HTTP error as BigQuery explains it (`error.message` of its JSON body).
async fn status_error(what: &str, status: u16, response: reqwest::Response) -> LoadError {
    let body: Value = response.json().await.unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or("no message");
    let text = format!("{what}: bigquery answered {status}: {message}");
    if status == 429 || status >= 500 {
        LoadError::Transient(text)
    } else {
        LoadError::Refused(text)
    }
}

/// What a checkpoint records of a sink's loads: every epoch up to
/// `loaded_upto` is loaded (or had no files), and `pending` lists the later
/// epochs submitted but not yet loaded (or whose loads failed). A restarted
/// sink loads those, and the epochs after `loaded_upto` on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadProgress {
    pub loaded_upto: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<u64>,
}

/// A filesystem sink's loads while the job runs: what the restored
/// checkpoint left pending (and epochs after it found on disk), then each
/// checkpoint's files once it commits. Each runs on a task of its own; none
/// holds the stream up. Failures are logged and stay pending in the
/// checkpoints (`engage checkpoints` lists them) until a start or `engage
/// bigquery load` loads them.
pub struct SinkLoads {
    job: String,
    sink: String,
    client: std::sync::Arc<BigQuery>,
    /// Epochs submitted and not loaded yet (failed ones stay).
    outstanding: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
}

impl SinkLoads {
    /// Starts loading what `restored` left pending and any epoch after its
    /// `loaded_upto` on disk (listed now, before this run commits anything,
    /// so no epoch is submitted twice).
    pub async fn start(
        job: &str,
        sink: &str,
        options: &FilesystemOptions,
        restored: Option<&LoadProgress>,
    ) -> Result<Option<SinkLoads>, String> {
        let Some(client) = BigQuery::new(options)? else {
            return Ok(None);
        };
        let loads = SinkLoads {
            job: job.to_string(),
            sink: sink.to_string(),
            client: std::sync::Arc::new(client),
            outstanding: Default::default(),
        };
        let mut epochs = command::epochs_on_disk(options, None).await?;
        if let Some(restored) = restored {
            epochs.retain(|epoch, _| {
                *epoch > restored.loaded_upto || restored.pending.contains(epoch)
            });
        }
        loads.spawn(epochs);
        Ok(Some(loads))
    }

    /// Loads the files a checkpoint published (their target paths).
    pub fn committed(&self, targets: Vec<String>) {
        self.spawn(by_epoch(targets));
    }

    /// The progress checkpoint `epoch` records (its own files are published
    /// after it is written, so they count as not loaded).
    pub fn progress(&self, epoch: u64) -> LoadProgress {
        let outstanding = self.outstanding.lock().unwrap();
        let first = outstanding.iter().next().copied().unwrap_or(epoch);
        LoadProgress {
            loaded_upto: first.min(epoch).saturating_sub(1),
            pending: outstanding.iter().copied().collect(),
        }
    }

    fn spawn(&self, epochs: BTreeMap<u64, Vec<String>>) {
        if epochs.is_empty() {
            return;
        }
        self.outstanding
            .lock()
            .unwrap()
            .extend(epochs.keys().copied());
        let (client, job, sink) = (self.client.clone(), self.job.clone(), self.sink.clone());
        let outstanding = self.outstanding.clone();
        tokio::spawn(async move {
            let summary = command::load_epochs(&client, &job, &sink, epochs, |epoch, loaded| {
                if loaded {
                    outstanding.lock().unwrap().remove(&epoch);
                }
            })
            .await;
            for failure in &summary.failed {
                tracing::warn!(
                    sink = %sink,
                    table = %client.table(),
                    "bigquery load failed (pending; the next start or `engage bigquery load` retries it): {failure}"
                );
            }
            if summary.loaded_now > 0 {
                tracing::info!(sink = %sink, table = %client.table(), epochs = summary.loaded_now, rows = summary.rows, "loaded into bigquery");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_name_job_sink_and_epoch() {
        assert_eq!(
            job_id("engagement", "enriched_events", 42),
            "engage_engagement_enriched_events_000000000042"
        );
        assert_eq!(job_id("my.job", "a b", 1), "engage_my_job_a_b_000000000001");
    }

    #[test]
    fn files_group_by_the_epoch_in_their_name() {
        let epochs = by_epoch([
            "event_date=2026-12-01/part-000000000007-0000-1a2b3c4d.parquet".to_string(),
            "event_date=2026-12-02/part-000000000007-0001-00000000.parquet".to_string(),
            "part-000000000009-0000-ffffffff.parquet".to_string(),
            "_staging/x.staged".to_string(),
        ]);
        assert_eq!(epochs.keys().copied().collect::<Vec<_>>(), [7, 9]);
        assert_eq!(epochs[&7].len(), 2);
    }
}

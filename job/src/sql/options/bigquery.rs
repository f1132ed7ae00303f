//! `bigquery.*` options of a `filesystem` sink: load what the sink writes
//! into a BigQuery table (see `crate::bigquery`).

use super::{FilesystemOptions, Options, Redacted};

/// Where and how a filesystem sink's files are loaded into BigQuery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BigQueryOptions {
    pub project: String,
    pub dataset: String,
    pub table: String,
    /// The job location (`US`, `EU`, `europe-west1`, ...), if not the default.
    pub location: Option<String>,
    /// A service-account key file; default: `GOOGLE_APPLICATION_CREDENTIALS`.
    pub credentials: Option<String>,
    /// Another API root than `https://bigquery.googleapis.com` (an emulator);
    /// it may hold credentials, so it is redacted.
    pub endpoint: Option<Redacted>,
    /// The `gs://` URI under which BigQuery reads the sink's files.
    pub source_uri_prefix: String,
}

impl BigQueryOptions {
    /// Takes the `bigquery.*` options (none: `Ok(None)`).
    pub(super) fn parse(
        options: &mut Options,
        filesystem: &FilesystemOptions,
    ) -> Result<Option<BigQueryOptions>, String> {
        let table = options.take("bigquery.table");
        let others = [
            "bigquery.location",
            "bigquery.credentials",
            "bigquery.endpoint",
            "bigquery.source_uri_prefix",
        ];
        let Some(table) = table else {
            if let Some(other) = others.iter().find(|o| options.values.contains_key(**o)) {
                return Err(format!(
                    "option `{other}` needs `bigquery.table` = 'project.dataset.table' (the table to load into)"
                ));
            }
            return Ok(None);
        };
        let parts: Vec<&str> = table.split('.').collect();
        let valid = |part: &str, extra: &[char]| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
        };
        let [project, dataset, name] = parts[..] else {
            return Err(format!(
                "option `bigquery.table` must be `project.dataset.table`, got `{table}`"
            ));
        };
        if !valid(project, &['-', ':']) || !valid(dataset, &[]) || !valid(name, &['-', '$']) {
            return Err(format!(
                "option `bigquery.table`: `{table}` has a part BigQuery does not accept \
                 (project: letters, digits, `-`; dataset: letters, digits, `_`; table: letters, digits, `_`, `-`)"
            ));
        }
        let endpoint = options.take("bigquery.endpoint").map(Redacted::new);
        if let Some(endpoint) = &endpoint {
            if !matches!(
                url::Url::parse(endpoint.expose())
                    .map(|u| u.scheme().to_string())
                    .as_deref(),
                Ok("http" | "https")
            ) {
                return Err(format!(
                    "option `bigquery.endpoint` must be an http(s) URL, got `{endpoint}`"
                ));
            }
        }
        let source_uri_prefix = match options.take("bigquery.source_uri_prefix") {
            Some(prefix) => prefix,
            None if filesystem.path.starts_with("gs://") => filesystem.path.clone(),
            None => {
                return Err(format!(
                    "option `bigquery.source_uri_prefix` is needed: the sink writes to `{}`, not to a gs:// URL \
                     BigQuery can read; give the gs:// URI under which the same files are (e.g. copied by \
                     `gcloud storage rsync`)",
                    filesystem.path
                ))
            }
        };
        if !source_uri_prefix.starts_with("gs://") {
            return Err(format!(
                "option `bigquery.source_uri_prefix` must be a gs:// URI, got `{source_uri_prefix}`"
            ));
        }
        Ok(Some(BigQueryOptions {
            project: project.to_string(),
            dataset: dataset.to_string(),
            table: name.to_string(),
            location: options.take("bigquery.location"),
            credentials: options.take("bigquery.credentials"),
            endpoint,
            source_uri_prefix: source_uri_prefix.trim_end_matches('/').to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::ParquetCompression;
    use super::*;

    fn parse(path: &str, pairs: &[(&str, &str)]) -> Result<Option<BigQueryOptions>, String> {
        let mut options = Options {
            values: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let filesystem = FilesystemOptions {
            path: path.into(),
            compression: ParquetCompression::Zstd,
            time_pattern: None,
            time_column: None,
            bigquery: None,
        };
        BigQueryOptions::parse(&mut options, &filesystem)
    }

    #[test]
    fn bigquery_options_are_checked_with_what_to_do() {
        let table = ("bigquery.table", "proj-1.ds.events");
        let parsed = parse("gs://bucket/events/", &[table]).unwrap().unwrap();
        assert_eq!(
            (
                parsed.project.as_str(),
                parsed.dataset.as_str(),
                parsed.table.as_str()
            ),
            ("proj-1", "ds", "events")
        );
        assert_eq!(parsed.source_uri_prefix, "gs://bucket/events");
        assert!(parse("data/events", &[]).unwrap().is_none());
        let error = parse("data/events", &[table]).unwrap_err();
        assert!(
            error.contains("`bigquery.source_uri_prefix` is needed"),
            "{error}"
        );
        let error = parse("gs://b/e", &[("bigquery.table", "ds.events")]).unwrap_err();
        assert!(error.contains("project.dataset.table"), "{error}");
        let error = parse("gs://b/e", &[("bigquery.location", "EU")]).unwrap_err();
        assert!(error.contains("needs `bigquery.table`"), "{error}");
        let error = parse(
            "gs://b/e",
            &[table, ("bigquery.endpoint", "localhost:9050")],
        )
        .unwrap_err();
        assert!(error.contains("http(s) URL"), "{error}");
        let error =
            parse("data/e", &[table, ("bigquery.source_uri_prefix", "s3://x")]).unwrap_err();
        assert!(error.contains("must be a gs:// URI"), "{error}");
    }
}

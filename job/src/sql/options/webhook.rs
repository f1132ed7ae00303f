//! Options of `connector = 'webhook'`, named as Arroyo names them
//! (`endpoint`, `headers`, `format`), plus engage's `webhook.*` settings:
//! rows per request, the Standard Webhooks signing secret, requests in
//! flight and the request timeout.

use std::time::Duration;

use arrow::datatypes::Schema;
use base64::Engine as _;

use super::{one_of, Options, Redacted};
use crate::change::{LSN_COLUMN, SEQ_COLUMN};

pub(super) const WEBHOOK_OPTIONS: &[&str] = &[
    "connector",
    "type",
    "endpoint",
    "headers",
    "format",
    "webhook.batch_size",
    "webhook.secret",
    "webhook.max_in_flight",
    "webhook.timeout",
];

/// Rows per request unless `webhook.batch_size` says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 100;
/// Requests in flight at once unless `webhook.max_in_flight` says otherwise.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;
/// How long one request may take unless `webhook.timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A header sent with every request. Its value may be a credential
/// (`Authorization: Bearer ...`), so `Debug` shows the name only.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ***", self.name)
    }
}

/// A Standard Webhooks signing key (`whsec_<base64>`), decoded. `Debug`
/// never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(pub Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "whsec_***")
    }
}

#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// `http://` or `https://` URL; may hold credentials, so it is redacted.
    pub endpoint: Redacted,
    pub headers: Vec<Header>,
    /// Rows per request; 1 sends each row as one JSON object, more send a
    /// JSON array.
    pub batch_size: usize,
    pub secret: Option<SigningKey>,
    pub max_in_flight: usize,
    pub timeout: Duration,
}

impl WebhookOptions {
    /// Parses the options left after `connector`.
    pub(super) fn parse(options: &mut Options) -> Result<WebhookOptions, String> {
        one_of("type", options.take("type"), &["sink"], "sink")?;
        one_of("format", options.take("format"), &["json"], "json")?;
        let endpoint = Redacted::new(options.require("endpoint", "webhook")?);
        match url::Url::parse(endpoint.expose()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(format!(
                    "option `endpoint` must be an http:// or https:// URL, got `{endpoint}` \
                     (in sql/examples/webhook.sql it comes from ENGAGE_WEBHOOK_URL)"
                ))
            }
        }
        let headers = match options.take("headers") {
            None => Vec::new(),
            Some(text) => parse_headers(&text)?,
        };
        let batch_size = options
            .number("webhook.batch_size")?
            .map_or(DEFAULT_BATCH_SIZE, |n| n as usize);
        if batch_size > 10_000 {
            return Err(format!(
                "option `webhook.batch_size` must be at most 10000 rows per request, got {batch_size}"
            ));
        }
        let max_in_flight = options
            .number("webhook.max_in_flight")?
            .map_or(DEFAULT_MAX_IN_FLIGHT, |n| n as usize);
        if max_in_flight > 256 {
            return Err(format!(
                "option `webhook.max_in_flight` must be at most 256, got {max_in_flight}"
            ));
        }
        let timeout = match options.take("webhook.timeout") {
            None => DEFAULT_TIMEOUT,
            Some(text) => parse_duration(&text).ok_or_else(|| {
                format!(
                    "option `webhook.timeout` must be a duration such as `10s`, `500ms` or `1m`, got `{text}`"
                )
            })?,
        };
        let secret = options
            .take("webhook.secret")
            .map(|text| signing_key(&text))
            .transpose()?;
        Ok(WebhookOptions {
            endpoint,
            headers,
            batch_size,
            secret,
            max_in_flight,
            timeout,
        })
    }

    /// The query must output `_lsn` and `_seq`: a batch's id is derived from
    /// its rows' positions.
    pub fn check_columns(&self, schema: &Schema, windowed: bool) -> Result<(), String> {
        if windowed {
            return Err(
                "a webhook sink takes a query's changes; a windowed query (hop/tumble) cannot feed \
                 it yet: send windows to a redis or filesystem sink"
                    .into(),
            );
        }
        for column in [LSN_COLUMN, SEQ_COLUMN] {
            if schema.index_of(column).is_err() {
                let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(format!(
                    "a webhook sink needs `{LSN_COLUMN}` and `{SEQ_COLUMN}` in its query's output (select them): \
                     each request's `webhook-id` is derived from its rows' positions, so a replay sends the \
                     same batches under the same ids; output columns: {}",
                    names.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// `Name: value[, Name: value...]` (Arroyo's form), or the same separated
/// by new lines.
fn parse_headers(text: &str) -> Result<Vec<Header>, String> {
    let mut headers = Vec::new();
    for part in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let Some((name, value)) = part.split_once(':') else {
            return Err(format!(
                "option `headers` must be `Name: value` pairs separated by commas; `{}` has no `:`",
                part.split_whitespace().next().unwrap_or(part)
            ));
        };
        let name = name.trim();
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid_name {
            return Err(format!(
                "option `headers`: `{name}` is not a valid header name"
            ));
        }
        let value = value.trim();
        if value.bytes().any(|b| b.is_ascii_control()) {
            return Err(format!(
                "option `headers`: the value of `{name}` holds a control character"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("webhook-") || lower == "content-type" {
            return Err(format!(
                "option `headers` cannot set `{name}`: engage sets it itself (Standard Webhooks)"
            ));
        }
        headers.push(Header {
            name: name.to_string(),
            value: value.to_string(),
        });
    }
    Ok(headers)
}

/// Decodes a Standard Webhooks secret: `whsec_` then base64.
fn signing_key(text: &str) -> Result<SigningKey, String> {
    let encoded = text.strip_prefix("whsec_").unwrap_or(text);
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| {
            "option `webhook.secret` must be `whsec_` followed by base64 (as Standard Webhooks \
             secrets are written); the value given does not decode"
                .to_string()
        })?;
    if key.len() < 16 {
        return Err(format!(
            "option `webhook.secret` decodes to {} bytes; use at least 16 random bytes \
             (e.g. `whsec_$(head -c 32 /dev/urandom | base64)`)",
            key.len()
        ));
    }
    Ok(SigningKey(key))
}

/// `500ms`, `10s`, `2m`; a bare number is seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return None,
    };
    (!duration.is_zero()).then_some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{parse_job, plan::JobPlan, SinkConnector};

    const EXAMPLE: &str = include_str!("../../../../sql/examples/webhook.sql");

    fn env(name: &str) -> Option<String> {
        match name {
            "ENGAGE_POSTGRES_URL" => Some("postgres://engage:pw@127.0.0.1:5432/app".into()),
            "ENGAGE_WEBHOOK_URL" => {
                Some("https://hooks:topsecret@notify.example.com/engage".into())
            }
            "ENGAGE_WEBHOOK_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            "ENGAGE_DATA_DIR" => Some("/tmp/engage-data".into()),
            _ => None,
        }
    }

    fn webhook_of(sql: &str) -> Result<WebhookOptions, String> {
        let spec = parse_job("webhook", sql, &env).map_err(|e| e.to_string())?;
        let table = spec
            .tables
            .iter()
            .find(|t| t.name == "finished_plays")
            .unwrap();
        match table.connector.as_sink() {
            Some(SinkConnector::Webhook(options)) => Ok(options.clone()),
            other => panic!("a webhook sink expected, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_example_plans_and_its_secrets_never_show() {
        let options = webhook_of(EXAMPLE).unwrap();
        assert_eq!(options.batch_size, 100);
        assert_eq!(options.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(options.timeout, DEFAULT_TIMEOUT);
        assert_eq!(options.secret.as_ref().unwrap().0.len(), 24);
        let shown = format!("{options:?}");
        assert!(
            !shown.contains("topsecret") && !shown.contains("MfKQ9r8"),
            "{shown}"
        );
        let spec = parse_job("webhook", EXAMPLE, &env).unwrap();
        JobPlan::new(&spec).await.unwrap();
    }

    #[tokio::test]
    async fn a_query_without_positions_is_refused_with_the_reason() {
        let sql = EXAMPLE.replace("       e._lsn,\n       e._seq\n", "       e.device AS d\n");
        let spec = parse_job("webhook", &sql, &env).unwrap();
        let error = JobPlan::new(&spec).await.unwrap_err().to_string();
        assert!(
            error.contains("needs `_lsn` and `_seq`") && error.contains("webhook-id"),
            "{error}"
        );
    }

    #[test]
    fn option_errors_say_what_is_wrong() {
        let with = |from: &str, to: &str| webhook_of(&EXAMPLE.replace(from, to)).unwrap_err();
        let error = with(
            "format    = 'json',",
            "format = 'json', 'webhook.retries' = '3',",
        );
        assert!(
            error.contains(
                "unknown option `webhook.retries` for connector `webhook`; valid options:"
            ),
            "{error}"
        );
        assert!(error.contains("webhook.max_in_flight"), "{error}");
        let error = with("'${ENGAGE_WEBHOOK_URL}'", "'ftp://x/y'");
        assert!(
            error.contains("must be an http:// or https:// URL"),
            "{error}"
        );
        let error = with("'webhook.batch_size' = '100'", "'webhook.batch_size' = '0'");
        assert!(error.contains("positive whole number"), "{error}");
        let error = with("'${ENGAGE_WEBHOOK_SECRET}'", "'whsec_???'");
        assert!(
            error.contains("does not decode") && !error.contains("???"),
            "{error}"
        );
    }

    #[test]
    fn headers_are_name_value_pairs() {
        let headers = parse_headers("Authorization: Bearer abc, X-Team: data").unwrap();
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[0].name, "Authorization");
        assert_eq!(headers[0].value, "Bearer abc");
        assert_eq!(format!("{:?}", headers[0]), "Authorization: ***");
        assert!(parse_headers("Authorization Bearer abc")
            .unwrap_err()
            .contains("no `:`"));
        assert!(parse_headers("webhook-id: x")
            .unwrap_err()
            .contains("sets it itself"));
    }

    #[test]
    fn secrets_are_whsec_base64_and_never_shown() {
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(key.0.len(), 24);
        assert_eq!(format!("{key:?}"), "whsec_***");
        assert!(signing_key("whsec_not base64!").is_err());
        assert!(signing_key("whsec_c2hvcnQ=")
            .unwrap_err()
            .contains("at least 16"));
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("1h"), None);
    }
}

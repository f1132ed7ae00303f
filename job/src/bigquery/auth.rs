//! Access tokens for the BigQuery API, from Google's application default
//! credentials, looked up in their usual order:
//!
//! 1. `bigquery.credentials`, else the file `GOOGLE_APPLICATION_CREDENTIALS`
//!    names, else gcloud's `~/.config/gcloud/application_default_credentials.json`
//!    (`gcloud auth application-default login`): a **service-account key**
//!    (a JWT signed with its RSA key, RS256, exchanged at its `token_uri`:
//!    the OAuth 2.0 JWT bearer grant) or **user credentials** (their refresh
//!    token exchanged at Google's token endpoint);
//! 2. else the **metadata server** of the Google VM or container the job
//!    runs on (`GCE_METADATA_HOST` overrides its address).
//!
//! A token is kept until a minute before it expires.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Value};

use super::LoadError;

const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

/// Where tokens come from.
enum Source {
    /// A service account's identity and key.
    ServiceAccount {
        email: String,
        token_uri: String,
        key: RsaKeyPair,
    },
    /// gcloud's user credentials.
    User {
        client_id: String,
        client_secret: String,
        refresh_token: String,
        token_uri: String,
    },
    /// The metadata server at this address (`host[:port]`).
    Metadata(String),
}

/// A token source and the current token.
pub struct Auth {
    source: Source,
    token: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Source::ServiceAccount { email, .. } => write!(f, "Auth(service account {email})"),
            Source::User { .. } => write!(f, "Auth(user credentials)"),
            Source::Metadata(host) => write!(f, "Auth(metadata server {host})"),
        }
    }
}

const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

impl Auth {
    /// Reads a credentials file: a service-account key or gcloud's user
    /// credentials (`"type": "authorized_user"`).
    pub fn from_key_file(path: &str) -> Result<Auth, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the BigQuery credentials {path}: {e}"))?;
        let key: Value = serde_json::from_str(&text)
            .map_err(|e| format!("the BigQuery credentials {path} are not JSON: {e}"))?;
        let field = |name: &str| {
            key[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("the BigQuery credentials {path} have no `{name}`"))
        };
        let token_uri = field("token_uri").unwrap_or_else(|_| GOOGLE_TOKEN_URI.into());
        let source = match key["type"].as_str() {
            Some("service_account") => {
                let pem = field("private_key")?;
                let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| format!("the private key in {path} is not PKCS#8 PEM: {e}"))?;
                let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                    .map_err(|e| format!("the private key in {path} is not an RSA key: {e}"))?;
                Source::ServiceAccount {
                    email: field("client_email")?,
                    token_uri,
                    key,
                }
            }
            Some("authorized_user") => Source::User {
                client_id: field("client_id")?,
                client_secret: field("client_secret")?,
                refresh_token: field("refresh_token")?,
                token_uri,
            },
            other => {
                return Err(format!(
                    "the BigQuery credentials {path} are of type {}; engage reads service-account keys \
                     (`service_account`) and gcloud's user credentials (`authorized_user`)",
                    other.unwrap_or("(none)")
                ))
            }
        };
        Ok(Auth {
            source,
            token: Mutex::new(None),
        })
    }

    /// Application default credentials (see the module's header).
    pub fn default_credentials() -> Result<Auth, String> {
        if let Ok(path) = std::env::var("GOOGLE_APPLICATION_CREDENTIALS") {
            if !path.is_empty() {
                return Self::from_key_file(&path);
            }
        }
        if let Some(home) = std::env::var_os("HOME") {
            let gcloud = std::path::Path::new(&home)
                .join(".config/gcloud/application_default_credentials.json");
            if gcloud.exists() {
                return Self::from_key_file(&gcloud.display().to_string());
            }
        }
        let host = std::env::var("GCE_METADATA_HOST")
            .unwrap_or_else(|_| "metadata.google.internal".into());
        Ok(Auth {
            source: Source::Metadata(host),
            token: Mutex::new(None),
        })
    }

    /// A valid access token, fetched when there is none or it expires soon.
    pub async fn token(&self, http: &reqwest::Client) -> Result<String, LoadError> {
        if let Some((token, until)) = self.token.lock().unwrap().clone() {
            if Instant::now() < until {
                return Ok(token);
            }
        }
        let request = match &self.source {
            Source::ServiceAccount {
                email,
                token_uri,
                key,
            } => {
                let assertion = jwt(email, token_uri, key)?;
                http.post(token_uri).form(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ])
            }
            Source::User {
                client_id,
                client_secret,
                refresh_token,
                token_uri,
            } => http.post(token_uri).form(&[
                ("grant_type", "refresh_token"),
                ("client_id", client_id.as_str()),
                ("client_secret", client_secret.as_str()),
                ("refresh_token", refresh_token.as_str()),
            ]),
            Source::Metadata(host) => http
                .get(format!(
                    "http://{host}/computeMetadata/v1/instance/service-accounts/default/token"
                ))
                .query(&[("scopes", SCOPE)])
                .header("Metadata-Flavor", "Google"),
        };
        let response = request.send().await.map_err(|e| {
            LoadError::Transient(format!(
                "token request failed ({self:?}; outside Google Cloud, set bigquery.credentials or \
                 GOOGLE_APPLICATION_CREDENTIALS): {}",
                e.without_url()
            ))
        })?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or_default();
        let Some(token) = body["access_token"].as_str() else {
            let message = format!(
                "the token endpoint answered {status} ({self:?}): {}",
                body["error_description"]
                    .as_str()
                    .or(body["error"].as_str())
                    .unwrap_or("no reason")
            );
            return Err(if status >= 500 {
                LoadError::Transient(message)
            } else {
                LoadError::Refused(message)
            });
        };
        let lifetime = body["expires_in"].as_u64().unwrap_or(3600);
        let until = Instant::now() + Duration::from_secs(lifetime.saturating_sub(60));
        *self.token.lock().unwrap() = Some((token.to_string(), until));
        Ok(token.to_string())
    }
}

/// The signed JWT of the service-account grant.
fn jwt(email: &str, token_uri: &str, key: &RsaKeyPair) -> Result<String, LoadError> {
    let now = chrono::Utc::now().timestamp();
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = url.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = url.encode(
        json!({"iss": email, "scope": SCOPE, "aud": token_uri, "iat": now, "exp": now + 3600})
            .to_string(),
    );
    let signed = format!("{header}.{claims}");
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signed.as_bytes(),
        &mut signature,
    )
    .map_err(|_| LoadError::Refused("cannot sign the token request".into()))?;
    Ok(format!("{signed}.{}", url.encode(signature)))
}

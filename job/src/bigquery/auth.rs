//! Access tokens for the BigQuery API from a service-account key file (the
//! OAuth 2.0 JWT bearer grant Google documents): a JWT signed with the
//! key's RSA key (RS256) is exchanged at the key's `token_uri` for an
//! access token, kept until a minute before it expires.
//!
//! The key file is `bigquery.credentials`, else the file
//! `GOOGLE_APPLICATION_CREDENTIALS` names (application default
//! credentials). User credentials from `gcloud auth application-default
//! login` and the metadata server of a Google VM are not supported yet: the
//! error says so.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Value};

use super::LoadError;

const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

/// A service account's identity and key, and the current token.
pub struct Auth {
    email: String,
    token_uri: String,
    key: RsaKeyPair,
    token: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auth({})", self.email)
    }
}

impl Auth {
    /// Reads a service-account key file (JSON, `"type": "service_account"`).
    pub fn from_key_file(path: &str) -> Result<Auth, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the BigQuery credentials {path}: {e}"))?;
        let key: Value = serde_json::from_str(&text)
            .map_err(|e| format!("the BigQuery credentials {path} are not JSON: {e}"))?;
        if key["type"] != "service_account" {
            return Err(format!(
                "the BigQuery credentials {path} are of type {}; engage reads service-account key \
                 files (`\"type\": \"service_account\"`) only",
                key["type"]
            ));
        }
        let field = |name: &str| {
            key[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("the BigQuery credentials {path} have no `{name}`"))
        };
        let pem = field("private_key")?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("the private key in {path} is not PKCS#8 PEM: {e}"))?;
        let key_pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format!("the private key in {path} is not an RSA key: {e}"))?;
        Ok(Auth {
            email: field("client_email")?,
            token_uri: field("token_uri")
                .unwrap_or_else(|_| "https://oauth2.googleapis.com/token".into()),
            key: key_pair,
            token: Mutex::new(None),
        })
    }

    /// Application default credentials: the key file
    /// `GOOGLE_APPLICATION_CREDENTIALS` names.
    pub fn default_credentials() -> Result<Auth, String> {
        match std::env::var("GOOGLE_APPLICATION_CREDENTIALS") {
            Ok(path) if !path.is_empty() => Self::from_key_file(&path),
            _ => Err(
                "no BigQuery credentials: set `bigquery.credentials` to a service-account key file, or \
                 GOOGLE_APPLICATION_CREDENTIALS (gcloud user credentials and the metadata server are not \
                 supported yet)"
                    .into(),
            ),
        }
    }

    /// A valid access token, fetched when there is none or it expires soon.
    pub async fn token(&self, http: &reqwest::Client) -> Result<String, LoadError> {
        if let Some((token, until)) = self.token.lock().unwrap().clone() {
            if Instant::now() < until {
                return Ok(token);
            }
        }
        let now = chrono::Utc::now().timestamp();
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = url.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = url.encode(
            json!({
                "iss": self.email,
                "scope": SCOPE,
                "aud": self.token_uri,
                "iat": now,
                "exp": now + 3600,
            })
            .to_string(),
        );
        let signed = format!("{header}.{claims}");
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .map_err(|_| LoadError::Refused("cannot sign the token request".into()))?;
        let assertion = format!("{signed}.{}", url.encode(signature));
        let response = http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| {
                LoadError::Transient(format!("token request failed: {}", e.without_url()))
            })?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or_default();
        let Some(token) = body["access_token"].as_str() else {
            let message = format!(
                "the token endpoint answered {status} for {}: {}",
                self.email,
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

//! TLS to Postgres, from the connection URL's `sslmode` and `sslrootcert`
//! as libpq reads them, for both of a job's connections: the control
//! connection (tokio-postgres over rustls) and the replication stream
//! (pgwire-replication, rustls too).
//!
//! | `sslmode` | encrypted | server certificate checked |
//! | --- | --- | --- |
//! | `disable` (engage's default) | no | – |
//! | `prefer` | if the server offers TLS | no |
//! | `require` | yes | no |
//! | `verify-ca` | yes | signed by a trusted CA |
//! | `verify-full` | yes | signed by a trusted CA and names the host connected to |
//!
//! Trusted CAs: the PEM file `sslrootcert` names, else the public roots.
//! tokio-postgres knows neither the verify modes nor `sslrootcert`, so both
//! are taken out of the URL before it is parsed.
//!
//! pgwire-replication 0.5's `verify-ca` still checks the host name under
//! rustls 0.23 (it waives only the old form of the name error). So the
//! control connection, which always comes first, remembers a DNS name of
//! the certificate it verified, and the stream presents that name: the
//! chain is verified on both connections, the name on neither, as
//! `verify-ca` means.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pgwire_replication::TlsConfig;

use crate::sql::options::take_query_params;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A connection's TLS settings.
#[derive(Debug, Clone)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    /// `verify-ca`: a DNS name of the certificate the control connection
    /// verified (shared by the clones of one target).
    certificate_name: Arc<Mutex<Option<String>>>,
}

impl PgTls {
    /// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL; returns
    /// the URL without them and the settings. A string that is not a URL
    /// (`host=... user=...`) is returned unchanged, without TLS.
    pub fn split(url: &str) -> Result<(String, PgTls), String> {
        let mut tls = PgTls {
            mode: SslMode::Disable,
            root_cert: None,
            certificate_name: Arc::default(),
        };
        let Ok(mut parsed) = url::Url::parse(url) else {
            return Ok((url.to_string(), tls));
        };
        for (key, value) in take_query_params(&mut parsed, &["sslmode", "sslrootcert"]) {
            if key == "sslrootcert" {
                tls.root_cert = Some(PathBuf::from(value));
                continue;
            }
            tls.mode = match value.as_str() {
                "disable" => SslMode::Disable,
                "prefer" => SslMode::Prefer,
                "require" => SslMode::Require,
                "verify-ca" => SslMode::VerifyCa,
                "verify-full" => SslMode::VerifyFull,
                other => {
                    return Err(format!(
                        "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
                    ))
                }
            };
        }
        if tls.root_cert.is_some() && !matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(
                "sslrootcert is only used to verify the server: add sslmode=verify-full (or verify-ca)"
                    .into(),
            );
        }
        Ok((parsed.to_string(), tls))
    }

    /// The mode tokio-postgres is told: it negotiates TLS; the checks are
    /// rustls' ([`PgTls::client_config`]).
    pub fn tokio_postgres_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Mode;
        match self.mode {
            SslMode::Disable => Mode::Disable,
            SslMode::Prefer => Mode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Mode::Require,
        }
    }

    /// The rustls configuration of the control connection.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        let config = match self.mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let verifier =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(self.roots()?), provider)
                        .build()
                        .map_err(|e| format!("cannot set up certificate verification: {e}"))?;
                if self.mode == SslMode::VerifyFull {
                    builder.with_webpki_verifier(verifier).with_no_client_auth()
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AnyName {
                            verifier,
                            seen: self.certificate_name.clone(),
                        }))
                        .with_no_client_auth()
                }
            }
        };
        Ok(config)
    }

    /// The same settings for the replication stream.
    pub fn replication(&self) -> TlsConfig {
        // pgwire-replication builds its rustls configuration with the
        // process' default provider, which must be chosen when more than
        // one is compiled in (ring here, aws-lc-rs for object_store's HTTP).
        // Installing fails harmlessly when one is installed already.
        if self.mode != SslMode::Disable {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        match self.mode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::default()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => {
                let tls = TlsConfig::verify_ca(self.root_cert.clone());
                match self.certificate_name.lock().unwrap().clone() {
                    Some(name) => tls.with_sni_hostname(name),
                    None => tls,
                }
            }
            SslMode::VerifyFull => TlsConfig::verify_full(self.root_cert.clone()),
        }
    }

    /// The CAs `sslrootcert` holds, else the system's.
    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certificates: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect())
                    .map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
                if certificates.is_empty() {
                    return Err(format!(
                        "sslrootcert {} holds no PEM certificate",
                        path.display()
                    ));
                }
                for certificate in certificates {
                    roots
                        .add(certificate)
                        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
            }
            None => {
                for certificate in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(certificate);
                }
            }
        }
        Ok(roots)
    }
}

/// What an error connecting with `tls` may need added: how to fix a
/// certificate the settings refuse.
pub fn hint(tls: &PgTls, error: &str) -> &'static str {
    if tls.mode == SslMode::Disable || !error.contains("certificate") {
        ""
    } else if error.contains("not valid for name") || error.contains("NotValidForName") {
        " (sslmode=verify-full: the server's certificate does not name the host in the URL; \
         connect with a host name it names, or use sslmode=verify-ca)"
    } else {
        " (the server's certificate is not signed by a CA in sslrootcert, or in the system's \
         roots without it: point sslrootcert at the CA's PEM file)"
    }
}

/// `sslmode=require` (and `prefer`): encrypted, the certificate not checked,
/// as libpq does without a root certificate. The handshake's signatures are
/// still verified.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain is verified, the host name is not. It
/// remembers a DNS name of the certificate (see the module's header).
#[derive(Debug)]
struct AnyName {
    verifier: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verified = match self.verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        ) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => ServerCertVerified::assertion(),
            other => other?,
        };
        if let Some(name) = dns_name(end_entity) {
            *self.seen.lock().unwrap() = Some(name);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier.supported_verify_schemes()
    }
}

/// The first DNS name in a certificate's subject alternative names.
fn dns_name(certificate: &CertificateDer<'_>) -> Option<String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let certificate = x509_cert::Certificate::from_der(certificate.as_ref()).ok()?;
    let (_, names) = certificate.tbs_certificate.get::<SubjectAltName>().ok()??;
    names.0.into_iter().find_map(|name| match name {
        GeneralName::DnsName(name) => Some(name.to_string()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_settings_leave_the_url() {
        let (url, tls) = PgTls::split(
            "postgres://u:p@db.example.com:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let (url, tls) = PgTls::split("postgres://u@h/app").unwrap();
        assert_eq!(url, "postgres://u@h/app");
        assert_eq!(tls.mode, SslMode::Disable);
        assert!(PgTls::split("postgres://h/app?sslmode=allow")
            .unwrap_err()
            .contains("not one of"));
        assert!(PgTls::split("postgres://h/app?sslrootcert=/x")
            .unwrap_err()
            .contains("verify-full"));
    }

    #[test]
    fn every_mode_builds_a_client_config() {
        for mode in [
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            let tls = PgTls {
                mode,
                root_cert: None,
                certificate_name: Arc::default(),
            };
            tls.client_config().unwrap();
        }
        let missing = PgTls {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
            certificate_name: Arc::default(),
        };
        assert!(missing
            .client_config()
            .unwrap_err()
            .contains("cannot read sslrootcert"));
    }
}

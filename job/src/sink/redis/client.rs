//! A Redis client for a sink's `address`: `redis://` in the clear,
//! `rediss://` over TLS (rustls). With TLS the server's certificate is
//! verified against the system's roots, or against the PEM file the URL's
//! `sslrootcert` query parameter names (as for Postgres), which engage
//! takes out of the URL before the redis crate reads it.

use std::path::Path;

use crate::sql::options::take_query_params;

/// The client for `address`; the error says what is wrong, without the
/// address (it may hold a password).
pub fn client(address: &str) -> Result<redis::Client, String> {
    let Ok(mut url) = url::Url::parse(address) else {
        return redis::Client::open(address).map_err(|e| e.to_string());
    };
    let root_cert = take_query_params(&mut url, &["sslrootcert"]).pop();
    if url.scheme() == "rediss" {
        // The redis crate builds its rustls configuration with the
        // process' default provider (several are compiled in).
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some((_, path)) = root_cert else {
        return redis::Client::open(address).map_err(|e| e.to_string());
    };
    if url.scheme() != "rediss" {
        return Err("sslrootcert needs a rediss:// (TLS) address".into());
    }
    let pem = std::fs::read(Path::new(&path))
        .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?;
    redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_needs_tls_and_a_readable_file() {
        assert!(client("redis://127.0.0.1:6379?sslrootcert=/x.pem")
            .unwrap_err()
            .contains("rediss://"));
        assert!(
            client("rediss://127.0.0.1:6379?sslrootcert=/nonexistent/ca.pem")
                .unwrap_err()
                .contains("cannot read sslrootcert /nonexistent/ca.pem")
        );
        client("rediss://127.0.0.1:6379").unwrap();
        client("redis://:pw@127.0.0.1:6379/2").unwrap();
    }
}

//! TLS to Postgres: a server started with a certificate this test makes
//! (its own CA, the certificate naming `localhost` only). The mission runs
//! with `sslmode=verify-full` (both the control connection and the
//! replication stream encrypted, every sink equal to the oracle);
//! `verify-full` to an address the certificate does not name, and a CA that
//! did not sign it, stop the job with what to change; `verify-ca` accepts
//! the address.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use engage::embedded::PostgresOptions;
use support::*;

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a second CA, and a server certificate for `localhost` signed by
/// the first, in a directory the server's user can read.
fn certificates() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    std::fs::write(
        path.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for ca in ["ca", "other-ca"] {
        openssl(
            path,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=engage test {ca}"),
            ],
        );
    }
    openssl(
        path,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        path,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    // Postgres wants its key private to the user it runs as (`postgres`
    // when the tests run as root).
    let mode = |file: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path.join(file), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mode(".", 0o755);
    mode("server.pem", 0o644);
    mode("server.key", 0o600);
    if unsafe { libc::geteuid() } == 0 {
        let status = Command::new("chown")
            .args(["postgres", path.join("server.key").to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let (ca, other) = (path.join("ca.pem"), path.join("other-ca.pem"));
    (dir, ca, other)
}

/// The world's Postgres URL to `host` with `query` added.
fn url(world: &World, host: &str, query: &str) -> String {
    format!(
        "{}?{query}",
        world.postgres_url.replacen("127.0.0.1", host, 1)
    )
}

/// The mission running with Postgres at `url`, once it has a checkpoint.
async fn started(world: &World, url: &str) -> Job {
    let mut job = world.start_job_env(
        &["run"],
        MISSION_SQL,
        "0.3",
        &[("ENGAGE_POSTGRES_URL", url)],
    );
    wait_started(world, &mut job).await;
    job
}

/// Runs the mission until it exits (it is expected to refuse to start).
fn refused(world: &World, url: &str) -> String {
    let mut job = world.start_job_env(&["run"], MISSION_SQL, "10", &[("ENGAGE_POSTGRES_URL", url)]);
    let status = job.wait_exit(Duration::from_secs(60), "refusing to start");
    assert!(!status.success());
    job.log_tail()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mission_runs_over_verified_tls_and_wrong_certificates_are_refused() {
    let (certs, ca, other_ca) = certificates();
    let dir = certs.path();
    let world = World::start_with(PostgresOptions {
        extra_settings: vec![
            ("ssl".into(), "on".into()),
            (
                "ssl_cert_file".into(),
                dir.join("server.pem").display().to_string(),
            ),
            (
                "ssl_key_file".into(),
                dir.join("server.key").display().to_string(),
            ),
        ],
        ..PostgresOptions::default()
    })
    .await;
    seed_for_oracle(&world, 20, 31).await;

    let log = refused(
        &world,
        &url(
            &world,
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        ),
    );
    assert!(log.contains("does not name the host"), "{log}");
    let log = refused(
        &world,
        &url(
            &world,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
        ),
    );
    assert!(log.contains("not signed by a CA in sslrootcert"), "{log}");

    // verify-ca checks the chain, not the name.
    let verify_ca = url(
        &world,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    );
    started(&world, &verify_ca).await.stop();

    let verify_full = url(
        &world,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let mut job = started(&world, &verify_full).await;
    let client = world.sql().await;
    let encrypted = |backend: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s
                     JOIN pg_stat_activity a USING (pid)
                     WHERE a.backend_type = $1 AND a.pid <> pg_backend_pid()",
                    &[&backend],
                )
                .await
                .unwrap();
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        }
    };
    // The verify-ca run left checkpoints: wait for this run's stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (ssl, all) = loop {
        let counts = encrypted("walsender").await;
        if counts.1 > 0 || std::time::Instant::now() > deadline {
            break counts;
        }
        job.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        ssl == 1 && all == 1,
        "replication stream: {ssl} of {all} encrypted"
    );
    let (ssl, all) = encrypted("client backend").await;
    assert!(
        ssl >= 1 && ssl == all,
        "control connections: {ssl} of {all} encrypted"
    );
    // 6 s: updates and deletes pause in the last 3 s of each minute, and the
    // oracle wants some.
    engage::chaos::workload::Workload::start(
        &world.postgres_url,
        engage::chaos::workload::WorkloadOptions::mixed(Some(12_000), 2_000, 31, 20),
    )
    .wait_done()
    .await
    .expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    job.stop();
    assert_matches_oracle(&world, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_sinks_write_over_tls_and_a_foreign_ca_is_refused() {
    let (certs, ca, other_ca) = certificates();
    let dir = certs.path();
    let mut world = World::start().await;
    // The same server on a plain port (for the oracle) and a TLS port (for the job).
    let tls_port = engage::embedded::free_port().unwrap();
    let file = |name: &str| dir.join(name).display().to_string();
    world.redis = engage::embedded::EmbeddedRedis::start_with(
        &world.root.path().join("redis-tls"),
        engage::embedded::RedisOptions {
            extra_args: vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                file("server.pem"),
                "--tls-key-file".into(),
                file("server.key"),
                "--tls-ca-cert-file".into(),
                file("ca.pem"),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
            ..Default::default()
        },
    )
    .await
    .expect("redis starts with TLS");
    seed_for_oracle(&world, 20, 32).await;
    let rediss = |ca: &Path| {
        format!(
            "rediss://localhost:{tls_port}/?sslrootcert={}",
            ca.display()
        )
    };

    let foreign = rediss(&other_ca);
    let mut job = world.start_job_env(
        &["run"],
        MISSION_SQL,
        "10",
        &[("ENGAGE_REDIS_URL", &foreign)],
    );
    let status = job.wait_exit(Duration::from_secs(60), "refusing to start");
    assert!(!status.success());
    let log = job.log_tail();
    assert!(
        log.contains("failed to connect to redis") && log.contains("certificate"),
        "{log}"
    );
    // That first start made the slot, then failed before its first
    // checkpoint: it dropped the slot again, so the next start is a first one.
    assert!(
        log.contains("dropped the replication slot this first start created"),
        "{log}"
    );
    assert_eq!(world.slot_count().await, 0);

    let trusted = rediss(&ca);
    let mut job = world.start_job_env(
        &["run"],
        MISSION_SQL,
        "0.3",
        &[("ENGAGE_REDIS_URL", &trusted)],
    );
    wait_started(&world, &mut job).await;
    // 6 s: updates and deletes pause in the last 3 s of each minute, and the
    // oracle wants some.
    engage::chaos::workload::Workload::start(
        &world.postgres_url,
        engage::chaos::workload::WorkloadOptions::mixed(Some(12_000), 2_000, 32, 20),
    )
    .wait_done()
    .await
    .expect("the workload ran");
    wait_caught_up(&world, &mut job).await;
    job.stop();
    assert_matches_oracle(&world, &[]).await;
}

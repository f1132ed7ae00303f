//! docker-compose.yml (no Docker engine runs on our machines): the file
//! parses, wires the services the job needs with the variables the mission
//! SQL reads, and agrees with what the README says about it; Prometheus
//! scrapes the job with its token, and every metric the Grafana dashboard
//! queries is one the job exports.

use std::collections::BTreeSet;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> serde_yaml::Value {
    serde_yaml::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is YAML")
}

/// The `${ENGAGE_*}` variables the mission SQL substitutes.
fn variables_of_mission_sql() -> BTreeSet<String> {
    let sql = read("sql/engagement.sql");
    sql.split("${")
        .skip(1)
        .filter_map(|rest| rest.split('}').next())
        .map(str::to_string)
        .collect()
}

/// The items of a YAML list, as text (`what` names it when it is not a list).
fn strings(value: &serde_yaml::Value, what: &str) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("{what} is not a list"))
        .iter()
        .map(text)
        .collect()
}

/// The argument after `flag` in a service's command.
fn argument_after<'a>(command: &'a [String], flag: &str) -> &'a str {
    command
        .iter()
        .skip_while(|a| *a != flag)
        .nth(1)
        .unwrap_or_else(|| panic!("engage runs with {flag}"))
}

fn text(value: &serde_yaml::Value) -> String {
    match value {
        serde_yaml::Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap(),
    }
}

#[test]
fn compose_runs_the_job_with_every_service_and_variable_it_needs() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<String> = services.keys().map(text).collect();
    for needed in ["postgres", "redis", "kafka", "engage", "generator"] {
        assert!(names.contains(needed), "no service {needed}: {names:?}");
    }
    let postgres = &compose["services"]["postgres"];
    assert!(text(&postgres["image"]).starts_with("postgres:16"));
    let command: Vec<String> = strings(&postgres["command"], "postgres command");
    assert!(
        command.contains(&"wal_level=logical".to_string()),
        "{command:?}"
    );
    let kafka = text(&compose["services"]["kafka"]["image"]);
    assert!(
        kafka.starts_with("apache/kafka") || kafka.contains("redpanda"),
        "{kafka}"
    );
    for service in ["postgres", "redis", "kafka"] {
        assert!(
            compose["services"][service]["healthcheck"]["test"].is_sequence(),
            "{service} has no health check"
        );
    }

    let engage = &compose["services"]["engage"];
    assert_eq!(text(&engage["build"]), ".");
    let environment = engage["environment"]
        .as_mapping()
        .expect("engage environment");
    let set: BTreeSet<String> = environment.keys().map(text).collect();
    for variable in variables_of_mission_sql() {
        assert!(set.contains(&variable), "engage does not set {variable}");
    }
    // Every address points at a service of the file.
    for (variable, service) in [
        ("ENGAGE_POSTGRES_URL", "@postgres:5432/"),
        ("ENGAGE_REDIS_URL", "//redis:6379"),
        ("ENGAGE_KAFKA_BROKERS", "kafka:9092"),
    ] {
        let value = text(&engage["environment"][variable]);
        assert!(value.contains(service), "{variable}={value}");
    }
    for dependency in ["postgres", "redis", "kafka"] {
        assert_eq!(
            text(&engage["depends_on"][dependency]["condition"]),
            "service_healthy",
            "engage must wait for {dependency} to be healthy"
        );
    }
    let volumes: Vec<String> = strings(&engage["volumes"], "engage volumes");
    let data_dir = text(&engage["environment"]["ENGAGE_DATA_DIR"]);
    assert!(
        volumes.iter().any(|v| v.starts_with("checkpoints:")),
        "{volumes:?}"
    );
    assert!(
        volumes.iter().any(|v| v.ends_with(&format!(":{data_dir}"))),
        "{volumes:?}"
    );
    let command: Vec<String> = strings(&engage["command"], "engage command");
    let checkpoints = argument_after(&command, "--checkpoint-dir");
    assert!(
        volumes
            .iter()
            .any(|v| v.ends_with(&format!(":{checkpoints}"))),
        "{volumes:?}"
    );
    assert!(std::path::Path::new(&format!("{ROOT}/Dockerfile")).exists());
}

#[test]
fn the_readme_describes_the_compose_file_as_it_is() {
    let readme = read("README.md");
    let compose = compose();
    assert!(
        readme.contains("docker compose up"),
        "the README does not say how to start it"
    );
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let name = text(name);
        assert!(
            readme.contains(&format!("`{name}`")),
            "the README does not name service `{name}`"
        );
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let published = text(port);
            let host = published.split(':').next().unwrap();
            assert!(
                readme.contains(host),
                "the README does not give port {host} of `{name}`"
            );
        }
    }
    for variable in variables_of_mission_sql() {
        assert!(
            readme.contains(&variable),
            "the README does not document {variable}"
        );
    }
}

#[test]
fn prometheus_scrapes_the_job_with_the_token_it_is_given() {
    let compose = compose();
    let engage = &compose["services"]["engage"];
    let token = text(&engage["environment"]["ENGAGE_HTTP_TOKEN"]);
    let command: Vec<String> = strings(&engage["command"], "engage command");
    let http = argument_after(&command, "--http");
    let port = http.rsplit(':').next().unwrap();
    let prometheus: serde_yaml::Value =
        serde_yaml::from_str(&read("job/monitoring/prometheus.yml")).unwrap();
    let scrape = &prometheus["scrape_configs"][0];
    assert_eq!(text(&scrape["authorization"]["credentials"]), token);
    assert_eq!(
        text(&scrape["static_configs"][0]["targets"][0]),
        format!("engage:{port}")
    );
    let mounts: Vec<String> = strings(
        &compose["services"]["prometheus"]["volumes"],
        "prometheus volumes",
    );
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./job/monitoring/prometheus.yml:")),
        "{mounts:?}"
    );
    let grafana: Vec<String> = strings(
        &compose["services"]["grafana"]["volumes"],
        "grafana volumes",
    );
    for mount in &grafana {
        let local = mount.split(':').next().unwrap();
        assert!(
            std::path::Path::new(&format!("{ROOT}/{local}")).exists(),
            "grafana mounts {local}, which does not exist"
        );
    }
}

/// Metric names a scrape of the mission job shows (`# TYPE` lines, plus a
/// histogram's `_bucket`, `_sum` and `_count` series).
fn exported_metrics() -> BTreeSet<String> {
    let spec = engage::sql::parse_job("engagement", &read("sql/engagement.sql"), &|name| {
        Some(match name {
            "ENGAGE_POSTGRES_URL" => "postgres://u@127.0.0.1/db".to_string(),
            "ENGAGE_REDIS_URL" => "redis://127.0.0.1:6379".to_string(),
            "ENGAGE_KAFKA_BROKERS" => "127.0.0.1:9092".to_string(),
            _ => "/tmp/engage".to_string(),
        })
    })
    .unwrap();
    let stats = std::sync::Arc::new(engage::engine::stats::JobStats::for_job(&spec));
    let mut names = BTreeSet::new();
    for line in stats.prometheus().lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        names.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_the_job_exports() {
    let exported = exported_metrics();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("job/monitoring/grafana/dashboards/engage.json")).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(start) = rest.find("engage_") {
                let tail = &rest[start..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                queried.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let unknown: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the job does not export: {unknown:?}\nexported: {exported:?}"
    );
    // The figures the issue names are all on it.
    for needed in [
        "engage_source_changes_total",
        "engage_commit_to_visible_seconds_bucket",
        "engage_sink_lag_bytes",
        "engage_replication_lag_bytes",
        "engage_checkpoints_total",
        "engage_dead_letters_total",
        "engage_restarts_total",
    ] {
        assert!(queried.contains(needed), "the dashboard has no {needed}");
    }
}

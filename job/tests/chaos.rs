//! The fault suite's reduced form (`engage chaos --quick`), as CI runs it:
//! every scenario against real Postgres, Redis and Kafka (Tansu), with updates, deletes,
//! content changes and late events under the faults, every output compared
//! with the oracle. The full run (`engage chaos`, `--full`) is for our machines;
//! its figures are in the README's "Guarantees".

use std::process::Command;

#[test]
fn every_scenario_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("chaos-report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_engage"))
        .args(["chaos", "--quick", "--report"])
        .arg(&report)
        .current_dir(dir.path())
        .output()
        .expect("engage runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "engage chaos --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let scenarios = report["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        engage::chaos::SCENARIOS,
        "every scenario ran, in order"
    );
    for scenario in scenarios {
        assert_eq!(scenario["passed"], true, "{scenario:#}");
        let sinks = scenario["sinks"].as_array().unwrap();
        assert_eq!(sinks.len(), 14, "every output was checked: {scenario:#}");
        for sink in sinks {
            assert_eq!(sink["lost"], 0, "{sink:#}");
            assert_eq!(sink["duplicated"], 0, "{sink:#}");
        }
        assert!(
            scenario["events"].as_u64().unwrap() >= 10_000,
            "{scenario:#}"
        );
        // Every kind of change met the faults.
        let figure = |name: &str| {
            scenario["figures"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f[0] == name)
                .and_then(|f| f[1].as_f64())
                .unwrap_or(0.0)
        };
        for kind in ["updates", "deletes", "content_changes", "late_expected"] {
            assert!(figure(kind) > 0.0, "no {kind}: {scenario:#}");
        }
    }
    // Each scenario printed its line of figures.
    assert_eq!(
        stdout.lines().filter(|l| l.contains(" PASS ")).count(),
        engage::chaos::SCENARIOS.len(),
        "{stdout}"
    );
    let bad = &scenarios[4];
    let dead = bad["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == "dead_letter")
        .unwrap();
    assert!(dead["expected"].as_u64().unwrap() >= 100, "{dead:#}");
}

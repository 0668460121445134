//! A client that is not the CLI: `tests/clients/raw_client.py` speaks only the raw NATS text
//! protocol and the JSON of `docs/asyncapi.yaml`, authenticates with a submitter `.creds`
//! file as the document's security section says, submits a job and reads its result.

use std::time::Duration;

use tokio::process::Command;

use hodei_tests::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_speaking_only_raw_nats_and_the_documented_json_runs_a_job() {
    let system = System::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/raw_client.py");
    let url = system.nats.url.clone();
    let creds = system.submitter_creds();
    let python = std::env::var("HODEI_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.hodei/venv/bin/python").to_owned()
    });
    let run = Command::new(python)
        .arg(script)
        .args(["--nats-url", &url, "--timeout", "60", "--creds"])
        .arg(&creds)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the raw client ends")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "raw client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(result["state"], "Failed");
    assert_eq!(result["exit_code"], 7);
    let job_id = result["job_id"].as_str().unwrap().parse().unwrap();
    let job = system.get(job_id).await.unwrap();
    assert_eq!(
        job.correlation_id,
        result["correlation_id"].as_str().unwrap()
    );
    let batches = system.logs_of(job_id).await;
    let lines: Vec<_> = batches
        .iter()
        .flat_map(|b| &b.lines)
        .map(|l| l.line.as_str())
        .collect();
    assert_eq!(lines, ["raw client says hi"]);
}

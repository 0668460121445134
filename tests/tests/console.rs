//! The web console, in a real headless browser (tests/browser/console.py drives Debian's
//! chromium through chromedriver): it logs in with the operator's credential, watches a job
//! that the CLI submits go from Pending to Succeeded with its logs appearing, and pauses a
//! schedule. Screenshots are kept in target/test-artifacts/console/.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use hodei_protocol::api::AuditQuery;
use hodei_tests::{free_port, http_get, Service, System};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_job_live_with_its_logs_and_pauses_a_schedule() {
    let system = System::start().await;
    let created = system.hodei(&[
        "schedule",
        "create",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--",
        "true",
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    // A broken JobQueued: its consumers (the dispatcher's and the audit service's)
    // dead-letter it (the console discards one).
    system
        .js
        .publish(
            format!("hodei.events.job.{}.JobQueued", uuid::Uuid::now_v7()),
            "{broken".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let dead_letters = || async {
        hodei_messaging::api::request::<_, hodei_protocol::api::Page<hodei_protocol::api::DeadLetter>>(
            &system.client,
            hodei_protocol::subjects::API_DLQ_LIST,
            None,
            &serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .items
    };
    system
        .wait_for("two dead letters", Duration::from_secs(30), || async {
            dead_letters().await.len() == 2
        })
        .await;

    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("HODEI_NATS_URL".to_owned(), system.nats.url.clone()),
        ("HODEI_CONSOLE_ADDR".to_owned(), addr.clone()),
    ];
    let mut console = Service::spawn_instance("console", "console", &env, &system.log_dir);
    let base = format!("http://{addr}");
    system
        .wait_for("the console to listen", Duration::from_secs(30), || async {
            system.log_of("console").contains("console on http://")
        })
        .await;
    let (status, _) = http_get(&base, "/login").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(&base, "/jobs").await;
    assert_eq!(status, 303, "no session: to the login page");

    let artifacts = hodei_tests::bin_dir().join("../test-artifacts/console");
    std::fs::create_dir_all(&artifacts).unwrap();
    let python = std::env::var("HODEI_PYTHON").expect("HODEI_PYTHON (scripts/setup.sh sets it)");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/console.py");
    let mut browser = Command::new(python)
        .arg(&script)
        .arg(&base)
        .arg(system.operator_creds())
        .arg(system.submitter_creds())
        .arg(&artifacts)
        .arg("nightly")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the browser test");
    let mut said = BufReader::new(browser.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    if line.trim() != "READY" {
        let _ = browser.wait();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(browser.stderr.as_mut().unwrap(), &mut err);
        panic!("the browser did not get to the jobs page: {line} {err}");
    }

    // A job that waits a while (its key's only slot is taken) and then prints, some of it
    // markup, with a label that is markup too.
    let holder = system.hodei(&[
        "submit",
        "--concurrency-key",
        "console",
        "--max-concurrent",
        "1",
        "--",
        "sleep",
        "3",
    ]);
    assert!(holder.status.success());
    let submitted = system.hodei(&[
        "submit",
        "--concurrency-key",
        "console",
        "--max-concurrent",
        "1",
        "--label",
        "note=<img src=x onerror=window.pwned=1>",
        "--",
        "sh",
        "-c",
        "echo console-sees-this; echo '<b>not bold</b>'",
    ]);
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let job_id = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    writeln!(browser.stdin.as_mut().unwrap(), "{job_id}").unwrap();

    // Its report, up to OK (or its end).
    let reported = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        let mut line = String::new();
        while said.read_line(&mut line).is_ok_and(|n| n > 0) {
            out.push_str(&line);
            if line.trim() == "OK" {
                break;
            }
            line.clear();
        }
        (browser, out)
    });
    let (mut browser, out) = tokio::time::timeout(Duration::from_secs(180), reported)
        .await
        .expect("the browser test reports")
        .unwrap();
    if !out.ends_with("OK\n") {
        let _ = browser.wait();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(browser.stderr.as_mut().unwrap(), &mut err);
        panic!("browser: {out}\n{err}");
    }
    println!("{out}screenshots in {}", artifacts.display());
    assert!(artifacts.join("console-job.png").exists());

    // A page with its live stream is open: the console still stops by itself.
    let stopped = console.stop(Duration::from_secs(5));
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the console stops by itself on SIGTERM with a live page open: {stopped:?}"
    );
    writeln!(browser.stdin.as_mut().unwrap(), "done").unwrap();
    let status = tokio::task::spawn_blocking(move || browser.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());

    // The pause went through the API, as an audited change.
    let view = system.hodei(&["--json", "schedule", "get", "nightly"]);
    let view: serde_json::Value = serde_json::from_slice(&view.stdout).unwrap();
    assert_eq!(view["state"], "Paused");
    let id: uuid::Uuid = view["schedule_id"].as_str().unwrap().parse().unwrap();
    system
        .wait_for(
            "SchedulePaused in the audit log",
            Duration::from_secs(20),
            || async {
                !system
                    .audit(AuditQuery {
                        aggregate_id: Some(id),
                        event_type: Some("SchedulePaused".into()),
                        ..Default::default()
                    })
                    .await
                    .is_empty()
            },
        )
        .await;
    assert!(system
        .log_of("console")
        .contains("schedule changed from the console"));
    // The discard went through the API too, audited as the console's operator.
    assert_eq!(dead_letters().await.len(), 1);
    let discarded = system
        .audit(AuditQuery {
            event_type: Some("DeadLetterDiscarded".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(discarded.len(), 1);
    assert_eq!(discarded[0].actor, "console:operator");

    system.wait_all_settled(Duration::from_secs(60)).await;
}

//! Idempotency keys outlive a long log and a restart, and a client retry
//! after an ambiguous timeout never stores a second copy.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Events appended after the keyed one.
// NOTE: 50,000 took about 3 s against a release build on a 2-core machine.
// Lower it to 10,000 if the test takes more than about 30 s.
const FILLER_EVENTS: u64 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_key_dedupes_after_restart() {
    let mut server = Server::start();
    create_ok(&server, "ses-retention").await;
    let keyed =
        json!({"type": "t", "payload": {"n": 0}, "actor": "agent:a", "idempotency_key": "old-1"});

    let (status, body) = append(&server, "ses-retention", keyed.clone()).await;
    assert_eq!(status, 201, "keyed append: {body}");
    assert_eq!(body["seq"], json!(1), "keyed append gets seq 1");

    append_ticks(&server, "ses-retention", 1, FILLER_EVENTS, 32).await;
    let expected_last = FILLER_EVENTS + 1;
    assert_eq!(
        last_seq(&server, "ses-retention").await,
        expected_last,
        "last_seq after filler"
    );

    server.sigterm();
    server.restart();

    let (status, body) = append(&server, "ses-retention", keyed).await;
    assert_eq!(status, 201, "retry of the old key after restart: {body}");
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": expected_last, "deduped": true}),
        "the old key must return its original seq"
    );
    assert_eq!(
        last_seq(&server, "ses-retention").await,
        expected_last,
        "the retry must not append"
    );
}

/// Rounds of "give up on the first attempt, then retry".
const AMBIGUOUS_ROUNDS: u64 = 20;

/// Sends the first attempt of each keyed append so that the client cannot
/// know whether it was stored: odd rounds hang up right after sending,
/// even rounds use a 1 ms client timeout. Then retries with the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_timeout_retry_stores_once() {
    let server = Server::start();
    create_ok(&server, "ses-ambiguous").await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1))
        .build()
        .expect("client with a 1 ms timeout");
    let patient = reqwest::Client::new();
    let path = format!("{}/append", session_path("ses-ambiguous"));

    let mut timeouts = 0;
    for round in 1..=AMBIGUOUS_ROUNDS {
        let event = json!({
            "type": "t", "payload": {"round": round}, "actor": "agent:a",
            "idempotency_key": format!("amb-{round}")
        });
        if round % 2 == 1 {
            send_and_hang_up(&server, &path, &event).await;
        } else if impatient
            .post(server.http(&path))
            .json(&event)
            .send()
            .await
            .is_err()
        {
            timeouts += 1;
        }

        let (status, body) = append_with(&patient, &server, "ses-ambiguous", &event).await;
        assert_eq!(status, 201, "retry of amb-{round}: {body}");
    }
    eprintln!(
        "{timeouts} of {} 1 ms attempts timed out on the client",
        AMBIGUOUS_ROUNDS / 2
    );

    let last = last_seq(&server, "ses-ambiguous").await;
    assert_eq!(
        last, AMBIGUOUS_ROUNDS,
        "each key must be stored exactly once"
    );
    let frames = tail_collect(&server, "ses-ambiguous", 0, last, Duration::from_secs(30)).await;
    let mut per_key: HashMap<String, u64> = HashMap::new();
    for frame in &frames {
        let key = frame["idempotency_key"]
            .as_str()
            .unwrap_or("<none>")
            .to_string();
        *per_key.entry(key).or_default() += 1;
    }
    for round in 1..=AMBIGUOUS_ROUNDS {
        let key = format!("amb-{round}");
        assert_eq!(per_key.get(&key), Some(&1), "events stored with key {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_request_stored_at_most_once() {
    let server = Server::start();
    create_ok(&server, "ses-unkeyed").await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1))
        .build()
        .expect("client with a 1 ms timeout");
    let url = server.http(&format!("{}/append", session_path("ses-unkeyed")));

    for round in 0..AMBIGUOUS_ROUNDS {
        let event = json!({"type": "t", "payload": {"round": round}, "actor": "agent:a"});
        if round % 2 == 1 {
            send_and_hang_up(
                &server,
                &format!("{}/append", session_path("ses-unkeyed")),
                &event,
            )
            .await;
        } else {
            let _ = impatient.post(&url).json(&event).send().await;
        }
    }
    // A marker event orders behind anything the server still processes.
    let marker = append_ok(
        &server,
        "ses-unkeyed",
        json!({"type": "marker", "payload": {}, "actor": "a"}),
    )
    .await;

    let frames = tail_collect(&server, "ses-unkeyed", 0, marker, Duration::from_secs(30)).await;
    let mut per_round: HashMap<Value, u64> = HashMap::new();
    for frame in frames.iter().filter(|frame| frame["type"] == json!("t")) {
        *per_round
            .entry(frame["payload"]["round"].clone())
            .or_default() += 1;
    }
    for (round, count) in per_round {
        assert_eq!(count, 1, "request round {round} was stored {count} times");
    }
}

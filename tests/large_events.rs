//! Events near the body limit are stored and tailed intact, bodies over the
//! limit are rejected with 413 without being buffered, and a tail can
//! resume past a large event.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Map, Value};

/// Default `--max-body-bytes`: the largest request body, so the largest event.
const MAX_BODY: usize = 1_048_576;
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A metadata object of 10,000 keys, about half of `MAX_BODY` when serialized.
fn wide_metadata() -> Value {
    let mut metadata = Map::new();
    for key in 0..10_000 {
        metadata.insert(format!("k{key:05}"), Value::String("v".repeat(42)));
    }
    Value::Object(metadata)
}

#[tokio::test]
async fn large_events_round_trip() {
    let server = Server::start();
    create_ok(&server, "ses-large").await;

    let blob = json!({"type": "blob", "payload": {"data": "x".repeat(MAX_BODY - 1024)}, "actor": "agent:a"});
    let small = tick(2);
    let wide =
        json!({"type": "wide", "payload": {}, "actor": "agent:a", "metadata": wide_metadata()});
    let wide_size = wide.to_string().len();
    assert!(
        wide_size > MAX_BODY / 2 && wide_size < MAX_BODY,
        "wide event is {wide_size} bytes, meant to be between half and all of {MAX_BODY}"
    );
    let events = [blob, small, wide];
    for (index, event) in events.iter().enumerate() {
        let (status, body) = append(&server, "ses-large", event.clone()).await;
        assert_eq!(status, 201, "append large event {}: {body}", index + 1);
    }

    let mut tail = tail_open_with_max_message(&server, "ses-large", 0, MAX_BODY + 64 * 1024).await;
    let frames = read_until(&mut tail, 3, READ_TIMEOUT).await;
    assert_gapless(&frames, 1, 3, "tail of large events");
    for (frame, event) in frames.iter().zip(&events) {
        assert_eq!(
            frame["payload"], event["payload"],
            "payload of seq {}",
            frame["seq"]
        );
        assert_eq!(
            frame["metadata"],
            event.get("metadata").cloned().unwrap_or(json!({})),
            "metadata of seq {}",
            frame["seq"]
        );
    }

    let over =
        json!({"type": "blob", "payload": {"data": "x".repeat(MAX_BODY)}, "actor": "agent:a"});
    // A one-off client, because the connection that carried a rejected
    // body may be closed and must not be reused by later requests.
    let response = reqwest::Client::new()
        .post(server.http("/v1/sessions/ses-large/append"))
        .json(&over)
        .send()
        .await
        .expect("oversized append request failed");
    let (status, body) = read_json(response).await;
    assert_error(
        status,
        &body,
        413,
        "payload_too_large",
        "event over the body limit",
    );
    assert_eq!(
        last_seq(&server, "ses-large").await,
        3,
        "the rejected event must not be stored"
    );

    for cursor in [1u64, 2] {
        let frames = tail_collect(&server, "ses-large", cursor, 3, READ_TIMEOUT).await;
        assert_gapless(
            &frames,
            cursor + 1,
            3,
            &format!("resume at cursor={cursor}"),
        );
    }
}

/// Bodies of 200 MiB, declared up front or chunked.
const HUGE_BODY: usize = 200 * 1024 * 1024;

#[tokio::test]
async fn huge_body_rejected_without_buffering() {
    let server = Server::start();
    create_ok(&server, "ses-huge").await;
    let rss_before = server.rss_kib();

    for chunked in [false, true] {
        let (status, body) =
            send_large_body(&server, "/v1/sessions/ses-huge/append", HUGE_BODY, chunked).await;
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        assert_error(
            status,
            &body,
            413,
            "payload_too_large",
            &format!("200 MiB body, chunked={chunked}"),
        );
    }

    let rss_after = server.rss_kib();
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    eprintln!("server RSS {rss_before} KiB before, {rss_after} KiB after two 200 MiB bodies");
    assert!(
        growth_mib < 64,
        "server RSS grew by {growth_mib} MiB while rejecting 200 MiB bodies"
    );
    assert_eq!(last_seq(&server, "ses-huge").await, 0, "nothing stored");
}

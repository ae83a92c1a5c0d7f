//! Invalid tail cursors and `expected_seq` values are rejected with 400,
//! never read as 0, and never disturb other open tails.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const BAD_CURSOR_QUERIES: [&str; 14] = [
    "cursor=-1",
    "cursor=abc",
    "cursor=1.5",
    "cursor=1e3",
    "cursor=",
    "cursor=0x2",
    "cursor=%202",
    "cursor=18446744073709551616",
    "cursor=9223372036854775808",
    "cursor=%2B3",
    "cursor=+3",
    "cursor=03",
    "cursor=1&cursor=4",
    "cursor=4&cursor=1",
];

#[tokio::test]
async fn bad_cursors_rejected() {
    let server = Server::start();
    create_ok(&server, "ses-cursors").await;
    append_ticks(&server, "ses-cursors", 1, 5, 1).await;
    let mut bystander = tail_open(&server, "ses-cursors", 0).await;
    let replay = read_until(&mut bystander, 5, Duration::from_secs(30)).await;
    assert_gapless(&replay, 1, 5, "bystander replay");

    for query in BAD_CURSOR_QUERIES {
        let (status, body) = tail_reject(&server, &tail_path("ses-cursors", query)).await;
        assert_error(
            status,
            &body,
            400,
            "invalid_request",
            &format!("tail ?{query}"),
        );
    }

    append_ok(&server, "ses-cursors", tick(6)).await;
    let live = read_until(&mut bystander, 6, Duration::from_secs(30)).await;
    assert_gapless(
        &live,
        6,
        6,
        "an open tail keeps working after rejected cursors",
    );
}

#[tokio::test]
async fn bad_expected_seq_rejected() {
    let server = Server::start();
    create_ok(&server, "ses-expected").await;
    append_ticks(&server, "ses-expected", 1, 5, 1).await;

    for value in [
        json!(-1),
        json!(3.5),
        json!(null),
        json!("+3"),
        json!("03"),
        json!("18446744073709551616"),
    ] {
        let event = json!({"type": "t", "payload": {}, "actor": "a", "expected_seq": value});
        let (status, body) = append(&server, "ses-expected", event.clone()).await;
        assert_error(
            status,
            &body,
            400,
            "invalid_request",
            &format!("append {event}"),
        );
    }

    let raw = br#"{"type":"t","payload":{},"actor":"a","expected_seq":18446744073709551616}"#;
    let (status, body) = send_raw(
        &server,
        reqwest::Method::POST,
        "/v1/sessions/ses-expected/append",
        Some("application/json"),
        raw.to_vec(),
    )
    .await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "expected_seq 2^64 as a JSON number",
    );

    let stale = json!({"type": "t", "payload": {}, "actor": "a", "expected_seq": "3"});
    let (status, body) = append(&server, "ses-expected", stale).await;
    assert_error(
        status,
        &body,
        409,
        "expected_seq_conflict",
        "expected_seq \"3\" is valid but stale",
    );

    assert_eq!(
        last_seq(&server, "ses-expected").await,
        5,
        "rejected appends must not append"
    );

    let current = json!({"type": "t", "payload": {}, "actor": "a", "expected_seq": "5"});
    let (status, body) = append(&server, "ses-expected", current).await;
    assert_eq!(status, 201, "expected_seq \"5\" at last_seq 5: {body}");
}

//! `GET /v1/sessions/:id/tail`: replay then live, cursor validation, frame
//! shape, inbound frames and keepalive.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const READ_TIMEOUT: Duration = Duration::from_secs(30);

const FRAME_KEYS: [&str; 9] = [
    "seq",
    "type",
    "payload",
    "actor",
    "source",
    "metadata",
    "refs",
    "idempotency_key",
    "inserted_at",
];

#[tokio::test]
async fn tail_replays_then_streams_live() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let mut acks = append_ticks(&server, "s", 1, 5, 1).await;

    let mut tail = tail_open(&server, "s", 0).await;
    let replayed = read_until(&mut tail, 5, READ_TIMEOUT).await;
    assert_gapless(&replayed, 1, 5, "replay");

    acks.extend(append_ticks(&server, "s", 6, 3, 1).await);
    let live = read_until(&mut tail, 8, READ_TIMEOUT).await;
    assert_gapless(&live, 6, 8, "live");

    let all: Vec<Value> = replayed.into_iter().chain(live).collect();
    assert_frames_match_acks(&all, &acks, "replay then live");
}

#[tokio::test]
async fn tail_frame_shape_and_defaults() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let minimal = json!({"type": "t", "payload": {"a": 1}, "actor": "agent:a"});
    let full = json!({
        "type": "state",
        "payload": {"state": "running"},
        "actor": "agent:researcher",
        "source": "agent",
        "metadata": {"role": "worker"},
        "refs": {"to_seq": 1, "request_id": "req_123", "sequence_id": "seq_alpha", "step": 1},
        "idempotency_key": "run_123-step_8"
    });
    append_ok(&server, "s", minimal.clone()).await;
    append_ok(&server, "s", full.clone()).await;

    let frames = tail_collect(&server, "s", 0, 2, READ_TIMEOUT).await;

    for frame in &frames {
        let object = frame.as_object().expect("frame is an object");
        for key in FRAME_KEYS {
            assert!(object.contains_key(key), "frame lacks {key}: {frame}");
        }
        assert_eq!(
            object.len(),
            FRAME_KEYS.len(),
            "frame has extra keys: {frame}"
        );
        let inserted_at = frame["inserted_at"].as_str().unwrap_or("");
        assert!(
            is_rfc3339_utc(inserted_at),
            "inserted_at is not RFC 3339 UTC: {frame}"
        );
    }

    let first = &frames[0];
    assert_eq!(first["seq"], json!(1), "first seq");
    assert_eq!(first["type"], minimal["type"], "type");
    assert_eq!(first["payload"], minimal["payload"], "payload");
    assert_eq!(first["actor"], minimal["actor"], "actor");
    assert_eq!(first["source"], Value::Null, "absent source is null");
    assert_eq!(
        first["idempotency_key"],
        Value::Null,
        "absent idempotency_key is null"
    );
    assert_eq!(first["metadata"], json!({}), "absent metadata is {{}}");
    assert_eq!(first["refs"], json!({}), "absent refs is {{}}");

    let second = &frames[1];
    assert_eq!(second["seq"], json!(2), "second seq");
    for field in [
        "type",
        "payload",
        "actor",
        "source",
        "metadata",
        "refs",
        "idempotency_key",
    ] {
        assert_eq!(second[field], full[field], "stored {field}");
    }
}

#[tokio::test]
async fn tail_cursor_positions() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ticks(&server, "s", 1, 5, 1).await;

    let mut tail = tail_open_query(&server, "s", "").await;
    let frames = read_until(&mut tail, 5, READ_TIMEOUT).await;
    assert_gapless(&frames, 1, 5, "tail without a cursor starts at seq 1");

    for cursor in 0..=4u64 {
        let frames = tail_collect(&server, "s", cursor, 5, READ_TIMEOUT).await;
        assert_gapless(&frames, cursor + 1, 5, &format!("cursor={cursor}"));
    }
}

#[tokio::test]
async fn tail_cursor_at_end_waits() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ticks(&server, "s", 1, 3, 1).await;

    let mut tail = tail_open(&server, "s", 3).await;
    let early = read_for(&mut tail, Duration::from_millis(500)).await;
    assert!(
        early.is_empty(),
        "cursor=3 at last_seq 3 must replay nothing, got {early:?}"
    );

    append_ok(&server, "s", tick(4)).await;
    let live = read_until(&mut tail, 4, READ_TIMEOUT).await;
    assert_gapless(&live, 4, 4, "live append after cursor == last_seq");
}

#[tokio::test]
async fn tail_new_session_streams_live() {
    let server = Server::start();
    create_ok(&server, "s").await;

    let mut tail = tail_open(&server, "s", 0).await;
    let early = read_for(&mut tail, Duration::from_millis(300)).await;
    assert!(
        early.is_empty(),
        "an empty session replays nothing, got {early:?}"
    );

    append_ok(&server, "s", tick(1)).await;
    let live = read_until(&mut tail, 1, READ_TIMEOUT).await;
    assert_gapless(&live, 1, 1, "first live event");
}

/// Cursor values that are not canonical non-negative decimals.
const BAD_CURSORS: [&str; 17] = [
    "cursor=-1",
    "cursor=abc",
    "cursor=1.5",
    "cursor=1e3",
    "cursor=",
    "cursor=0x2",
    "cursor=%202",
    "cursor=2%20",
    "cursor=18446744073709551616",
    "cursor=9223372036854775808",
    "cursor=%2B3",
    "cursor=+3",
    "cursor=03",
    "cursor=00",
    "cursor=1&cursor=4",
    "cursor=0&cursor=0",
    "cursor",
];

#[tokio::test]
async fn tail_rejects_bad_cursors() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ticks(&server, "s", 1, 5, 1).await;

    for query in BAD_CURSORS {
        let (status, body) = tail_reject(&server, &tail_path("s", query)).await;
        assert_error(
            status,
            &body,
            400,
            "invalid_request",
            &format!("tail ?{query}"),
        );
    }
}

#[tokio::test]
async fn tail_rejects_unknown_params() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ticks(&server, "s", 1, 2, 1).await;

    for query in [
        "from=1",
        "cursor=0&foo=1",
        "foo=1&cursor=0",
        "Cursor=1",
        "limit=1",
    ] {
        let (status, body) = tail_reject(&server, &tail_path("s", query)).await;
        assert_error(
            status,
            &body,
            400,
            "invalid_request",
            &format!("tail ?{query}"),
        );
    }
}

#[tokio::test]
async fn tail_rejects_cursor_beyond_end() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ticks(&server, "s", 1, 3, 1).await;

    for cursor in [4u64, 10, u64::MAX] {
        let (status, body) =
            tail_reject(&server, &tail_path("s", &format!("cursor={cursor}"))).await;
        let context = format!("tail cursor={cursor} at last_seq 3");
        assert_error(status, &body, 400, "invalid_request", &context);
        assert!(
            mentions_number(error_message(&body), 3),
            "{context}: message should include the current last_seq 3: {body}"
        );
    }
}

#[tokio::test]
async fn tail_unknown_or_invalid_session() {
    let server = Server::start();

    let (status, body) = tail_reject(&server, &tail_path("missing", "cursor=0")).await;
    assert_error(
        status,
        &body,
        404,
        "session_not_found",
        "tail of an unknown session",
    );

    let (status, body) = tail_reject(&server, &tail_path("missing", "")).await;
    assert_error(
        status,
        &body,
        404,
        "session_not_found",
        "tail of an unknown session, no cursor",
    );

    let (status, body) = tail_reject(&server, "/v1/sessions/with%20space/tail?cursor=0").await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "tail of an invalid path id",
    );
}

#[tokio::test]
async fn tail_ignores_inbound_frames() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ok(&server, "s", tick(1)).await;

    let mut tail = tail_open(&server, "s", 0).await;
    send_text(&mut tail, "hello").await;
    send_text(&mut tail, r#"{"type":"t","payload":{},"actor":"a"}"#).await;
    tail.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("failed to send a binary frame");
    tail.send(Message::Ping(vec![9u8].into()))
        .await
        .expect("failed to send a ping");

    let frames = read_until(&mut tail, 1, READ_TIMEOUT).await;
    assert_gapless(&frames, 1, 1, "replay after inbound frames");

    append_ok(&server, "s", tick(2)).await;
    let frames = read_until(&mut tail, 2, READ_TIMEOUT).await;
    assert_gapless(&frames, 2, 2, "live event after inbound frames");
    assert_eq!(
        last_seq(&server, "s").await,
        2,
        "inbound frames must not append"
    );
}

#[tokio::test]
async fn tail_keeps_responsive_client() {
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start_with(
        data_dir.path(),
        &[("STARCITE_TAIL_PING_INTERVAL_MS", "100")],
    );
    create_ok(&server, "s").await;

    let mut tail = tail_open(&server, "s", 0).await;
    let idle = read_for(&mut tail, Duration::from_millis(1500)).await;
    assert!(
        idle.is_empty(),
        "no events expected while idle, got {idle:?}"
    );

    append_ok(&server, "s", tick(1)).await;
    let frames = read_until(&mut tail, 1, READ_TIMEOUT).await;
    assert_gapless(&frames, 1, 1, "event after 15 ping intervals of idle time");
}

#[tokio::test]
async fn tail_closes_unresponsive_client() {
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start_with(
        data_dir.path(),
        &[("STARCITE_TAIL_PING_INTERVAL_MS", "100")],
    );
    create_ok(&server, "s").await;

    // The client neither reads nor sends pongs for many intervals.
    let mut tail = tail_open(&server, "s", 0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    match next_item(&mut tail, Duration::from_secs(10)).await {
        TailItem::Closed { .. } => {}
        TailItem::Event(frame) => panic!("an idle session sent an event: {frame}"),
        TailItem::Timeout => panic!("server kept a client that answered no ping for 15 intervals"),
    }
}

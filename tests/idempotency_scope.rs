//! Idempotency keys are scoped to one session: the same key string in
//! another session is a fresh key, and a failed append burns no key.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn keys_are_per_session() {
    let server = Server::start();
    create_ok(&server, "ses-scope-a").await;
    create_ok(&server, "ses-scope-b").await;
    let event_a = json!({"type": "t", "payload": {"v": "A"}, "actor": "agent:a", "idempotency_key": "shared-1"});
    let event_b = json!({"type": "t", "payload": {"v": "B"}, "actor": "agent:a", "idempotency_key": "shared-1"});

    let (status, body) = append(&server, "ses-scope-a", event_a.clone()).await;
    assert_eq!(status, 201, "append to A: {body}");
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": 1, "deduped": false}),
        "append to A"
    );

    let (status, body) = append(&server, "ses-scope-b", event_b.clone()).await;
    assert_eq!(status, 201, "same key, other event, in B: {body}");
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": 1, "deduped": false}),
        "B gets its own seq 1"
    );

    let frames = tail_collect(&server, "ses-scope-b", 0, 1, READ_TIMEOUT).await;
    assert_eq!(
        frames[0]["payload"],
        json!({"v": "B"}),
        "B stores its own payload"
    );

    let (status, body) = append(&server, "ses-scope-b", event_b).await;
    assert_eq!(status, 201, "identical retry in B: {body}");
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": 1, "deduped": true}),
        "retry in B dedupes"
    );

    assert_eq!(
        last_seq(&server, "ses-scope-a").await,
        1,
        "A still holds one event"
    );
    let frames = tail_collect(&server, "ses-scope-a", 0, 1, READ_TIMEOUT).await;
    assert_eq!(frames[0]["payload"], json!({"v": "A"}), "A is untouched");
    assert_eq!(
        last_seq(&server, "ses-scope-b").await,
        1,
        "B holds one event"
    );
}

#[tokio::test]
async fn key_not_burned_by_404() {
    let server = Server::start();
    let event = json!({"type": "t", "payload": {"v": "C"}, "actor": "agent:a", "idempotency_key": "shared-1"});

    let (status, body) = append(&server, "ses-scope-later", event.clone()).await;
    assert_error(
        status,
        &body,
        404,
        "session_not_found",
        "append to a session that does not exist yet",
    );

    create_ok(&server, "ses-scope-later").await;
    let (status, body) = append(&server, "ses-scope-later", event).await;
    assert_eq!(
        status, 201,
        "first use of the key after the session exists: {body}"
    );
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": 1, "deduped": false}),
        "the 404 must not have stored the key"
    );
}

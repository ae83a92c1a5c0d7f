//! `POST /v1/sessions/:id/append`: seq assignment, validation, body limits,
//! idempotency and optimistic concurrency.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Map, Value};

/// A valid event that validation cases modify one field at a time.
fn base_event() -> Value {
    json!({"type": "t", "payload": {"k": "v"}, "actor": "agent:a"})
}

/// `base_event` with `field` set to `value`, or removed when `value` is `None`.
fn with_field(field: &str, value: Option<Value>) -> Value {
    let mut event = base_event();
    let object = event.as_object_mut().expect("base event is an object");
    match value {
        Some(value) => object.insert(field.to_string(), value),
        None => object.remove(field),
    };
    event
}

fn append_path(id: &str) -> String {
    format!("{}/append", session_path(id))
}

/// Asserts a 400 naming `field`, and that the session did not change.
async fn assert_rejected(
    server: &Server,
    id: &str,
    event: Value,
    field: &str,
    expected_last_seq: u64,
) {
    let (status, body) = append(server, id, event.clone()).await;
    let context = format!("append {event}");
    assert_error(status, &body, 400, "invalid_request", &context);
    assert!(
        error_message(&body).contains(field),
        "{context}: message should name the field {field:?}: {body}"
    );
    assert_eq!(
        last_seq(server, id).await,
        expected_last_seq,
        "{context}: a rejected append changed last_seq"
    );
}

#[tokio::test]
async fn append_assigns_gapless_seqs() {
    let server = Server::start();
    create_ok(&server, "s").await;

    for n in 1..=5u64 {
        let (status, body) = append(&server, "s", tick(n)).await;
        assert_eq!(status, 201, "append {n}: {body}");
        assert_eq!(
            body,
            json!({"seq": n, "last_seq": n, "deduped": false}),
            "append {n} response"
        );
    }

    let (_, header) = get_session(&server, "s").await;
    assert_eq!(
        header["last_seq"],
        json!(5),
        "header last_seq after 5 appends"
    );
    assert!(
        is_rfc3339_utc(header["updated_at"].as_str().unwrap_or("")),
        "updated_at is RFC 3339 UTC: {header}"
    );
}

#[tokio::test]
async fn append_stores_every_field() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let event = json!({
        "type": "state",
        "payload": {"state": "running", "nested": {"list": [1, 2.5, "x", null, true]}},
        "actor": "agent:researcher",
        "source": "agent",
        "metadata": {"role": "worker"},
        "refs": {"to_seq": 0, "request_id": "req_123", "sequence_id": "seq_alpha", "step": 1, "custom": {"a": [1]}},
        "idempotency_key": "run_123-step_8",
        "expected_seq": 0
    });

    let (status, body) = append(&server, "s", event.clone()).await;
    assert_eq!(status, 201, "append full event: {body}");
    assert_eq!(body["seq"], json!(1), "seq of the full event");

    let frames = tail_collect(&server, "s", 0, 1, Duration::from_secs(30)).await;
    let frame = &frames[0];
    for field in [
        "type",
        "payload",
        "actor",
        "source",
        "metadata",
        "refs",
        "idempotency_key",
    ] {
        assert_eq!(
            frame[field], event[field],
            "stored {field} differs from the request"
        );
    }
    assert!(
        frame.get("expected_seq").is_none(),
        "expected_seq is a request guard, not an event field: {frame}"
    );
}

#[tokio::test]
async fn append_unknown_session() {
    let server = Server::start();

    let (status, body) = append(&server, "missing", tick(1)).await;
    assert_error(
        status,
        &body,
        404,
        "session_not_found",
        "append to an unknown session",
    );

    let (status, body) = get_session(&server, "missing").await;
    assert_error(
        status,
        &body,
        404,
        "session_not_found",
        "append must not create the session",
    );

    let (status, body) = send_raw(
        &server,
        Method::POST,
        "/v1/sessions/with%20space/append",
        Some("application/json"),
        tick(1).to_string().into_bytes(),
    )
    .await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "append to an invalid path id",
    );
}

#[tokio::test]
async fn append_rejects_required_fields() {
    let server = Server::start();
    create_ok(&server, "s").await;

    let cases = [
        ("type", None),
        ("type", Some(json!(""))),
        ("type", Some(json!(1))),
        ("type", Some(json!(null))),
        ("type", Some(json!(true))),
        ("type", Some(json!(["t"]))),
        ("type", Some(json!({"t": 1}))),
        ("actor", None),
        ("actor", Some(json!(""))),
        ("actor", Some(json!(1))),
        ("actor", Some(json!(null))),
        ("actor", Some(json!(false))),
        ("actor", Some(json!({"a": 1}))),
        ("payload", None),
        ("payload", Some(json!([]))),
        ("payload", Some(json!([{"k": "v"}]))),
        ("payload", Some(json!("text"))),
        ("payload", Some(json!(""))),
        ("payload", Some(json!(1))),
        ("payload", Some(json!(1.5))),
        ("payload", Some(json!(true))),
        ("payload", Some(json!(null))),
    ];

    for (field, value) in cases {
        assert_rejected(&server, "s", with_field(field, value), field, 0).await;
    }
}

#[tokio::test]
async fn append_rejects_optional_fields() {
    let server = Server::start();
    create_ok(&server, "s").await;

    let cases = [
        ("source", json!("")),
        ("source", json!(1)),
        ("source", json!(null)),
        ("source", json!({"a": 1})),
        ("source", json!(["agent"])),
        ("metadata", json!([])),
        ("metadata", json!("x")),
        ("metadata", json!(1)),
        ("metadata", json!(null)),
        ("metadata", json!(true)),
        ("refs", json!([])),
        ("refs", json!("x")),
        ("refs", json!(1)),
        ("refs", json!(null)),
        ("idempotency_key", json!("")),
        ("idempotency_key", json!(1)),
        ("idempotency_key", json!(null)),
        ("idempotency_key", json!({"k": 1})),
        ("idempotency_key", json!(["k"])),
    ];

    for (field, value) in cases {
        assert_rejected(&server, "s", with_field(field, Some(value)), field, 0).await;
    }
}

/// Values that are not a non-negative integer or its canonical decimal
/// string, shared by every integer field.
fn bad_integers() -> Vec<Value> {
    vec![
        json!(-1),
        json!(1.5),
        json!(3.5),
        json!(1.0),
        json!(1e3),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([1]),
        json!("abc"),
        json!("-1"),
        json!("+3"),
        json!("03"),
        json!(" 2"),
        json!("2 "),
        json!(""),
        json!("1.5"),
        json!("1e3"),
        json!("0x2"),
        json!("18446744073709551616"),
        json!("99999999999999999999999"),
    ]
}

#[tokio::test]
async fn append_rejects_bad_expected_seq() {
    let server = Server::start();
    create_ok(&server, "s").await;

    for value in bad_integers() {
        assert_rejected(
            &server,
            "s",
            with_field("expected_seq", Some(value)),
            "expected_seq",
            0,
        )
        .await;
    }
}

/// Integers beyond u64 written literally, which `serde_json::Value` cannot
/// carry, so they go out as raw bytes.
#[tokio::test]
async fn append_rejects_huge_integer_literals() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let cases = [
        (
            "expected_seq",
            r#"{"type":"t","payload":{},"actor":"a","expected_seq":18446744073709551616}"#,
        ),
        (
            "expected_seq",
            r#"{"type":"t","payload":{},"actor":"a","expected_seq":9223372036854775808000}"#,
        ),
        (
            "to_seq",
            r#"{"type":"t","payload":{},"actor":"a","refs":{"to_seq":18446744073709551616}}"#,
        ),
        (
            "step",
            r#"{"type":"t","payload":{},"actor":"a","refs":{"step":-9223372036854775809}}"#,
        ),
    ];

    for (field, body) in cases {
        let (status, response) = send_raw(
            &server,
            Method::POST,
            &append_path("s"),
            Some("application/json"),
            body.as_bytes().to_vec(),
        )
        .await;
        assert_error(
            status,
            &response,
            400,
            "invalid_request",
            &format!("append {body}"),
        );
        assert!(
            error_message(&response).contains(field),
            "append {body}: message should name {field}: {response}"
        );
    }
    assert_eq!(
        last_seq(&server, "s").await,
        0,
        "rejected literals must not append"
    );
}

#[tokio::test]
async fn append_rejects_bad_refs() {
    let server = Server::start();
    create_ok(&server, "s").await;

    for key in ["to_seq", "step"] {
        for value in bad_integers() {
            let event = with_field("refs", Some(json!({ key: value })));
            assert_rejected(&server, "s", event, key, 0).await;
        }
    }

    for key in ["request_id", "sequence_id"] {
        for value in [
            json!(1),
            json!(null),
            json!({"a": 1}),
            json!(["a"]),
            json!(true),
        ] {
            let event = with_field("refs", Some(json!({ key: value })));
            assert_rejected(&server, "s", event, key, 0).await;
        }
    }
}

#[tokio::test]
async fn append_rejects_unknown_fields() {
    let server = Server::start();
    create_ok(&server, "s").await;

    for field in [
        "expectedSeq",
        "idempotencyKey",
        "seq",
        "inserted_at",
        "foo",
        "Type",
    ] {
        let event = with_field(field, Some(json!(0)));
        assert_rejected(&server, "s", event, field, 0).await;
    }
}

#[tokio::test]
async fn append_accepts_integer_strings() {
    let server = Server::start();
    create_ok(&server, "s").await;

    let event = with_field("expected_seq", Some(json!("0")));
    let (status, body) = append(&server, "s", event).await;
    assert_eq!(
        status, 201,
        "expected_seq \"0\" on an empty session: {body}"
    );

    let event = with_field("expected_seq", Some(json!("1")));
    let (status, body) = append(&server, "s", event).await;
    assert_eq!(status, 201, "expected_seq \"1\" at last_seq 1: {body}");

    let event = with_field("refs", Some(json!({"to_seq": "41", "step": "0"})));
    let (status, body) = append(&server, "s", event).await;
    assert_eq!(status, 201, "refs with decimal strings: {body}");

    let event = with_field(
        "refs",
        Some(json!({"to_seq": u64::MAX, "step": u64::MAX.to_string()})),
    );
    let (status, body) = append(&server, "s", event).await;
    assert_eq!(status, 201, "refs at u64::MAX: {body}");

    let event = with_field("expected_seq", Some(json!(u64::MAX)));
    let (status, body) = append(&server, "s", event).await;
    assert_error(
        status,
        &body,
        409,
        "expected_seq_conflict",
        "expected_seq u64::MAX is valid but stale",
    );

    let event = with_field("expected_seq", Some(json!(u64::MAX.to_string())));
    let (status, body) = append(&server, "s", event).await;
    assert_error(
        status,
        &body,
        409,
        "expected_seq_conflict",
        "expected_seq \"u64::MAX\" is valid but stale",
    );

    assert_eq!(
        last_seq(&server, "s").await,
        4,
        "four appends were accepted"
    );
}

#[tokio::test]
async fn append_rejects_bad_bodies() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let path = append_path("s");
    let valid = base_event().to_string().into_bytes();

    let cases: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
        ("empty body", Some("application/json"), Vec::new()),
        ("empty body without content type", None, Vec::new()),
        (
            "truncated JSON",
            Some("application/json"),
            b"{\"type\": \"t\"".to_vec(),
        ),
        (
            "trailing garbage",
            Some("application/json"),
            [valid.clone(), b"x".to_vec()].concat(),
        ),
        (
            "not UTF-8",
            Some("application/json"),
            vec![0xff, 0xfe, 0x00],
        ),
        ("JSON array", Some("application/json"), b"[]".to_vec()),
        ("JSON string", Some("application/json"), b"\"t\"".to_vec()),
        ("JSON number", Some("application/json"), b"1".to_vec()),
        ("JSON null", Some("application/json"), b"null".to_vec()),
        ("text/plain", Some("text/plain"), valid.clone()),
        (
            "form content type",
            Some("application/x-www-form-urlencoded"),
            valid.clone(),
        ),
        ("no content type", None, valid.clone()),
    ];

    for (name, content_type, body) in cases {
        let (status, response) = send_raw(&server, Method::POST, &path, content_type, body).await;
        assert_error(
            status,
            &response,
            400,
            "invalid_request",
            &format!("append with {name}"),
        );
        assert_eq!(
            last_seq(&server, "s").await,
            0,
            "append with {name} changed last_seq"
        );
    }

    let (status, response) = send_raw(
        &server,
        Method::POST,
        &path,
        Some("application/json; charset=utf-8"),
        valid,
    )
    .await;
    assert_eq!(status, 201, "append with a charset parameter: {response}");
}

#[tokio::test]
async fn append_body_size_limit() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ok(&server, "s", tick(1)).await;
    let limit = 1_048_576;

    // A body whose serialized size is exactly the limit is accepted.
    let envelope = json!({"type": "blob", "payload": {"data": ""}, "actor": "agent:a"}).to_string();
    let fill = limit - envelope.len();
    let at_limit =
        json!({"type": "blob", "payload": {"data": "x".repeat(fill)}, "actor": "agent:a"});
    assert_eq!(
        at_limit.to_string().len(),
        limit,
        "test body sized to the limit"
    );
    let (status, body) = append(&server, "s", at_limit).await;
    assert_eq!(status, 201, "a body of exactly {limit} bytes: {body}");

    let (status, body) = send_large_body(&server, &append_path("s"), limit + 1, false).await;
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    assert_error(
        status,
        &body,
        413,
        "payload_too_large",
        "a body one byte over the limit",
    );

    let (status, body) = send_large_body(&server, &append_path("s"), 8 * limit, true).await;
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    assert_error(
        status,
        &body,
        413,
        "payload_too_large",
        "a chunked body over the limit",
    );

    let over =
        json!({"type": "blob", "payload": {"data": "x".repeat(fill + 1)}, "actor": "agent:a"});
    let (status, body) = send_large_body_json(&server, &append_path("s"), &over).await;
    assert_error(
        status,
        &body,
        413,
        "payload_too_large",
        "a valid event one byte over the limit",
    );

    assert_eq!(
        last_seq(&server, "s").await,
        2,
        "rejected large bodies must not append"
    );
    let seq = append_ok(&server, "s", tick(3)).await;
    assert_eq!(seq, 3, "the next append after rejected large bodies");
}

/// Sends a JSON event that is too large through a one-off `reqwest`
/// client, so the shared client's connection pool is not involved.
async fn send_large_body_json(server: &Server, path: &str, event: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(server.http(path))
        .json(event)
        .send()
        .await
        .expect("oversized append request failed");
    read_json(response).await
}

/// A keep-alive client that sent an oversized body must be able to send
/// its next request: the server either drains the body or announces
/// `Connection: close` on the 413.
#[tokio::test]
async fn oversized_body_keeps_client_usable() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let client = reqwest::Client::new();
    let over =
        json!({"type": "blob", "payload": {"data": "x".repeat(1_048_576)}, "actor": "agent:a"});

    for attempt in 1..=20 {
        let response = client
            .post(server.http(&append_path("s")))
            .json(&over)
            .send()
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "attempt {attempt}: a standard client sending a body over the limit got a \
                     transport error instead of the 413: {error:?}"
                )
            });
        let connection = response
            .headers()
            .get(reqwest::header::CONNECTION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        let (status, body) = read_json(response).await;
        assert_error(status, &body, 413, "payload_too_large", "oversized append");

        let next = client.get(server.http(&session_path("s"))).send().await;
        assert!(
            next.is_ok(),
            "attempt {attempt}: the request after a 413 failed on the same client ({:?}); \
             the 413 carried Connection: {connection:?}",
            next.err()
        );
    }
}

#[tokio::test]
async fn configured_body_limit() {
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start_with(data_dir.path(), &[("STARCITE_MAX_BODY_BYTES", "4096")]);
    create_ok(&server, "s").await;

    let small = json!({"type": "t", "payload": {"data": "x".repeat(3000)}, "actor": "agent:a"});
    let (status, body) = append(&server, "s", small).await;
    assert_eq!(status, 201, "a 3 KB event under a 4096-byte limit: {body}");

    let large = json!({"type": "t", "payload": {"data": "x".repeat(5000)}, "actor": "agent:a"});
    let (status, body) = append(&server, "s", large).await;
    assert_error(
        status,
        &body,
        413,
        "payload_too_large",
        "a 5 KB event over a 4096-byte limit",
    );
    assert_eq!(
        last_seq(&server, "s").await,
        1,
        "the rejected event must not be stored"
    );
}

#[tokio::test]
async fn dedupe_returns_original_seq() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let original = json!({
        "type": "state",
        "payload": {"a": 1, "b": {"x": [1, 2], "y": "z"}},
        "actor": "agent:a",
        "source": "agent",
        "metadata": {"m": 1, "n": 2},
        "refs": {"request_id": "r1", "step": 3},
        "idempotency_key": "key-1"
    });
    let (status, body) = append(&server, "s", original).await;
    assert_eq!(status, 201, "original append: {body}");
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": 1, "deduped": false}),
        "original response"
    );
    append_ok(&server, "s", tick(2)).await;

    // The same event with every object's keys in another order.
    let reordered: Value = serde_json::from_str(
        r#"{"idempotency_key":"key-1","refs":{"step":3,"request_id":"r1"},
            "metadata":{"n":2,"m":1},"source":"agent","actor":"agent:a",
            "payload":{"b":{"y":"z","x":[1,2]},"a":1},"type":"state"}"#,
    )
    .expect("reordered event parses");
    let (status, body) = append(&server, "s", reordered).await;
    assert_eq!(status, 201, "retried append: {body}");
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": 2, "deduped": true}),
        "a retry returns the original seq and the current last_seq"
    );
    assert_eq!(
        last_seq(&server, "s").await,
        2,
        "a deduped append must not append"
    );
}

#[tokio::test]
async fn dedupe_conflicts_on_different_event() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let original = json!({
        "type": "t",
        "payload": {"v": 1},
        "actor": "agent:a",
        "source": "agent",
        "metadata": {"m": 1},
        "refs": {"step": 1},
        "idempotency_key": "k"
    });
    append_ok(&server, "s", original.clone()).await;

    let changes: Vec<(&str, Option<Value>)> = vec![
        ("type", Some(json!("u"))),
        ("payload", Some(json!({"v": 2}))),
        ("payload", Some(json!({"v": 1, "w": 1}))),
        ("payload", Some(json!({"v": "1"}))),
        ("actor", Some(json!("agent:b"))),
        ("source", Some(json!("user"))),
        ("source", None),
        ("metadata", Some(json!({"m": 2}))),
        ("metadata", None),
        ("refs", Some(json!({"step": 2}))),
        ("refs", None),
    ];
    for (field, value) in changes {
        let mut event = original.clone();
        let object: &mut Map<String, Value> = event.as_object_mut().expect("object");
        match value {
            Some(value) => object.insert(field.to_string(), value),
            None => object.remove(field),
        };
        let (status, body) = append(&server, "s", event.clone()).await;
        assert_error(
            status,
            &body,
            409,
            "idempotency_conflict",
            &format!("reused key with {event}"),
        );
        assert_eq!(
            last_seq(&server, "s").await,
            1,
            "a conflicting retry must not append"
        );
    }
}

#[tokio::test]
async fn dedupe_runs_before_expected_seq() {
    let server = Server::start();
    create_ok(&server, "s").await;
    let original = json!({
        "type": "t", "payload": {"v": 1}, "actor": "agent:a",
        "idempotency_key": "k", "expected_seq": 0
    });
    let (status, body) = append(&server, "s", original.clone()).await;
    assert_eq!(status, 201, "original guarded append: {body}");
    append_ok(&server, "s", tick(2)).await;

    let (status, body) = append(&server, "s", original).await;
    assert_eq!(
        status, 201,
        "a retry with a stale expected_seq must dedupe: {body}"
    );
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": 2, "deduped": true}),
        "retry response"
    );

    let other_guard = json!({
        "type": "t", "payload": {"v": 1}, "actor": "agent:a",
        "idempotency_key": "k", "expected_seq": 7
    });
    let (status, body) = append(&server, "s", other_guard).await;
    assert_eq!(
        status, 201,
        "expected_seq is not part of event equality: {body}"
    );
    assert_eq!(
        body["deduped"],
        json!(true),
        "retry with another expected_seq dedupes"
    );

    let conflicting = json!({
        "type": "t", "payload": {"v": 2}, "actor": "agent:a",
        "idempotency_key": "k", "expected_seq": 2
    });
    let (status, body) = append(&server, "s", conflicting).await;
    assert_error(
        status,
        &body,
        409,
        "idempotency_conflict",
        "a different event with a current expected_seq",
    );
    assert_eq!(
        last_seq(&server, "s").await,
        2,
        "no append after dedupe and conflicts"
    );
}

#[tokio::test]
async fn expected_seq_guard() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ticks(&server, "s", 1, 42, 8).await;

    let (status, body) = append(&server, "s", with_field("expected_seq", Some(json!(41)))).await;
    assert_error(
        status,
        &body,
        409,
        "expected_seq_conflict",
        "expected_seq 41 at last_seq 42",
    );
    let message = error_message(&body);
    assert!(
        mentions_number(message, 41),
        "conflict message should name the expected seq 41: {message}"
    );
    assert!(
        mentions_number(message, 42),
        "conflict message should name the current seq 42: {message}"
    );

    let (status, body) = append(&server, "s", with_field("expected_seq", Some(json!(43)))).await;
    assert_error(
        status,
        &body,
        409,
        "expected_seq_conflict",
        "expected_seq ahead of last_seq",
    );
    assert_eq!(
        last_seq(&server, "s").await,
        42,
        "guarded conflicts must not append"
    );

    let (status, body) = append(&server, "s", with_field("expected_seq", Some(json!(42)))).await;
    assert_eq!(status, 201, "expected_seq equal to last_seq: {body}");
    assert_eq!(body["seq"], json!(43), "seq of the guarded append");
}

#[tokio::test]
async fn failed_append_keeps_key_free() {
    let server = Server::start();
    create_ok(&server, "s").await;
    append_ok(&server, "s", tick(1)).await;

    let guarded = json!({
        "type": "t", "payload": {"v": 1}, "actor": "agent:a",
        "idempotency_key": "k", "expected_seq": 0
    });
    let (status, body) = append(&server, "s", guarded).await;
    assert_error(
        status,
        &body,
        409,
        "expected_seq_conflict",
        "stale guard with a new key",
    );

    let different =
        json!({"type": "t", "payload": {"v": 2}, "actor": "agent:a", "idempotency_key": "k"});
    let (status, body) = append(&server, "s", different).await;
    assert_eq!(
        status, 201,
        "a key used only by a rejected append is still free: {body}"
    );
    assert_eq!(
        body,
        json!({"seq": 2, "last_seq": 2, "deduped": false}),
        "response"
    );
}

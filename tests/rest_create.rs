//! `POST /v1/sessions` and `GET /v1/sessions/:id`: ids, header shape,
//! validation and conflicts.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const HEADER_KEYS: [&str; 6] = [
    "id",
    "title",
    "metadata",
    "last_seq",
    "created_at",
    "updated_at",
];

#[track_caller]
fn assert_header_shape(header: &Value, context: &str) {
    let object = header
        .as_object()
        .unwrap_or_else(|| panic!("{context}: header is not an object: {header}"));
    for key in HEADER_KEYS {
        assert!(
            object.contains_key(key),
            "{context}: header lacks {key}: {header}"
        );
    }
    assert_eq!(
        object.len(),
        HEADER_KEYS.len(),
        "{context}: header has extra keys: {header}"
    );
    for key in ["created_at", "updated_at"] {
        let text = header[key].as_str().unwrap_or("");
        assert!(
            is_rfc3339_utc(text),
            "{context}: {key} is not RFC 3339 UTC: {header}"
        );
    }
}

#[tokio::test]
async fn create_generates_ses_id() {
    let server = Server::start();

    let (status, first) = create_session(&server, json!({})).await;
    assert_eq!(status, 201, "create with {{}}: {first}");
    assert_header_shape(&first, "generated session");
    let first_id = first["id"].as_str().expect("id is a string");
    assert!(
        first_id.starts_with("ses_"),
        "generated id {first_id:?} lacks the ses_ prefix"
    );
    assert_eq!(first["title"], Value::Null, "title defaults to null");
    assert_eq!(first["metadata"], json!({}), "metadata defaults to {{}}");
    assert_eq!(first["last_seq"], json!(0), "new session has last_seq 0");

    let (status, second) = create_session(&server, json!({})).await;
    assert_eq!(status, 201, "second create: {second}");
    assert_ne!(first["id"], second["id"], "two generated ids are equal");

    let (status, fetched) = get_session(&server, first_id).await;
    assert_eq!(status, 200, "GET generated session: {fetched}");
    assert_eq!(
        fetched, first,
        "GET returns the header that create returned"
    );
}

#[tokio::test]
async fn create_empty_body() {
    let server = Server::start();

    let (status, body) = send_raw(&server, Method::POST, "/v1/sessions", None, Vec::new()).await;
    assert_eq!(status, 201, "create with an empty body: {body}");
    assert_header_shape(&body, "empty-body session");
    assert!(
        body["id"].as_str().unwrap_or("").starts_with("ses_"),
        "generated id: {body}"
    );

    let (status, body) = send_raw(
        &server,
        Method::POST,
        "/v1/sessions",
        Some("application/json"),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 201, "create with an empty JSON-typed body: {body}");
}

#[tokio::test]
async fn create_custom_id_title_metadata() {
    let server = Server::start();
    let request = json!({
        "id": "ses_custom_123",
        "title": "Draft contract",
        "metadata": {"tenant_id": "acme", "nested": {"list": [1, 2, {"x": null}]}}
    });

    let (status, header) = create_session(&server, request.clone()).await;
    assert_eq!(status, 201, "create custom session: {header}");
    assert_header_shape(&header, "custom session");
    assert_eq!(header["id"], request["id"], "id echoed");
    assert_eq!(header["title"], request["title"], "title echoed");
    assert_eq!(header["metadata"], request["metadata"], "metadata echoed");
    assert_eq!(header["last_seq"], json!(0), "last_seq");

    let (status, fetched) = get_session(&server, "ses_custom_123").await;
    assert_eq!(status, 200, "GET custom session: {fetched}");
    assert_eq!(fetched, header, "GET returns the stored header");
}

#[tokio::test]
async fn create_existing_id_conflicts() {
    let server = Server::start();
    let (status, original) = create_session(&server, json!({"id": "dup", "title": "first"})).await;
    assert_eq!(status, 201, "first create: {original}");

    let (status, body) = create_session(&server, json!({"id": "dup", "title": "second"})).await;
    assert_error(
        status,
        &body,
        409,
        "session_exists",
        "second create with the same id",
    );

    let (status, body) = create_session(&server, json!({"id": "dup"})).await;
    assert_error(
        status,
        &body,
        409,
        "session_exists",
        "third create with the same id",
    );

    let (_, fetched) = get_session(&server, "dup").await;
    assert_eq!(
        fetched, original,
        "a rejected create must not change the header"
    );
}

#[tokio::test]
async fn create_accepts_valid_ids() {
    let server = Server::start();
    let long_id = "x".repeat(128);
    let ids = [
        "a",
        "Z",
        "0",
        "A-z0.9_:-",
        "ses:tenant.acme_1-2",
        "...",
        ".a",
        "a.",
        "a..b",
        "-",
        "_",
        ":",
        long_id.as_str(),
    ];

    for id in ids {
        let (status, header) = create_session(&server, json!({"id": id})).await;
        assert_eq!(status, 201, "create id {id:?}: {header}");
        assert_eq!(header["id"], json!(id), "id {id:?} echoed unchanged");

        let (status, fetched) = get_session(&server, id).await;
        assert_eq!(status, 200, "GET id {id:?}: {fetched}");
        assert_eq!(
            fetched["id"],
            json!(id),
            "GET id {id:?} returns that session"
        );

        let seq = append_ok(&server, id, tick(1)).await;
        assert_eq!(seq, 1, "first append to {id:?}");
    }
}

#[tokio::test]
async fn create_rejects_invalid_ids() {
    let server = Server::start();
    let too_long = "x".repeat(129);
    let ids = [
        "",
        ".",
        "..",
        too_long.as_str(),
        "a/b",
        "with space",
        " ",
        "ünï-çødé",
        "a%b",
        "%2F",
        "a\u{0}b",
        "a+b",
        "a?b",
        "a#b",
        "a\\b",
        "tab\tid",
        "line\nbreak",
    ];

    for id in ids {
        let (status, body) = create_session(&server, json!({"id": id})).await;
        assert_error(
            status,
            &body,
            400,
            "invalid_request",
            &format!("create id {id:?}"),
        );
    }
}

#[tokio::test]
async fn create_rejects_bad_field_types() {
    let server = Server::start();
    let cases = [
        ("id", json!({"id": 1})),
        ("id", json!({"id": null})),
        ("id", json!({"id": ["a"]})),
        ("id", json!({"id": {"a": 1}})),
        ("title", json!({"title": 1})),
        ("title", json!({"title": null})),
        ("title", json!({"title": {"a": 1}})),
        ("metadata", json!({"metadata": []})),
        ("metadata", json!({"metadata": "x"})),
        ("metadata", json!({"metadata": 1})),
        ("metadata", json!({"metadata": null})),
        ("metadata", json!({"metadata": true})),
    ];

    for (field, request) in cases {
        let (status, body) = create_session(&server, request.clone()).await;
        let context = format!("create {request}");
        assert_error(status, &body, 400, "invalid_request", &context);
        assert!(
            error_message(&body).contains(field),
            "{context}: message should name {field}: {body}"
        );
    }

    for request in [json!([]), json!("ses_x"), json!(1), json!(null)] {
        let (status, body) = create_session(&server, request.clone()).await;
        assert_error(
            status,
            &body,
            400,
            "invalid_request",
            &format!("create body {request}"),
        );
    }
}

#[tokio::test]
async fn create_rejects_bad_encoding() {
    let server = Server::start();

    let (status, body) = send_raw(
        &server,
        Method::POST,
        "/v1/sessions",
        Some("application/json"),
        b"{\"id\": \"a\"".to_vec(),
    )
    .await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "create with truncated JSON",
    );

    let (status, body) = send_raw(
        &server,
        Method::POST,
        "/v1/sessions",
        Some("text/plain"),
        b"{\"id\":\"b\"}".to_vec(),
    )
    .await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "create with text/plain",
    );

    let (status, body) = send_raw(
        &server,
        Method::POST,
        "/v1/sessions",
        None,
        b"{\"id\":\"c\"}".to_vec(),
    )
    .await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "create without a content type",
    );

    let (status, body) = send_raw(
        &server,
        Method::POST,
        "/v1/sessions",
        Some("application/json; charset=utf-8"),
        b"{\"id\":\"d\"}".to_vec(),
    )
    .await;
    assert_eq!(status, 201, "create with a charset parameter: {body}");

    for id in ["a", "b", "c"] {
        let (status, body) = get_session(&server, id).await;
        assert_error(
            status,
            &body,
            404,
            "session_not_found",
            &format!("session {id} after a rejected create"),
        );
    }
}

#[tokio::test]
async fn get_unknown_session() {
    let server = Server::start();

    let (status, body) = get_session(&server, "nope").await;
    assert_error(
        status,
        &body,
        404,
        "session_not_found",
        "GET unknown session",
    );

    let (status, body) = get_json(&server, "/v1/sessions/with%20space").await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "GET a path id with a space",
    );

    let (status, body) = get_json(&server, "/v1/sessions/a%2Fb").await;
    assert_error(
        status,
        &body,
        400,
        "invalid_request",
        "GET a path id with an encoded slash",
    );
}

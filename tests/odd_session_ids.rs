//! Session ids outside `A-Za-z0-9._:-`, 1–128 characters, are rejected with
//! 400. Valid ids with punctuation stay reachable through percent-encoded
//! paths and never collide with routes.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn odd_ids_rejected() {
    let server = Server::start();
    create_ok(&server, "a").await;
    let long_id = "x".repeat(10_000);
    let nfc = "caf\u{e9}";
    let nfd = "cafe\u{301}";
    let ids = [
        "a/b",
        "a/append",
        "with space",
        "ünï-çødé",
        "%2F",
        "..",
        ".",
        "",
        " ",
        long_id.as_str(),
        "ses\u{0}x",
        nfc,
        nfd,
    ];

    for id in ids {
        let context = format!("create id {:?}", id.chars().take(40).collect::<String>());
        let (status, body) = create_session(&server, json!({"id": id})).await;
        assert_error(status, &body, 400, "invalid_request", &context);

        let (status, body) = create_session(&server, json!({"id": id})).await;
        assert_error(
            status,
            &body,
            400,
            "invalid_request",
            &format!("{context}, second attempt"),
        );
    }

    assert_eq!(last_seq(&server, "a").await, 0, "session a is untouched");
}

#[tokio::test]
async fn encoded_path_ids_rejected() {
    let server = Server::start();
    create_ok(&server, "a").await;
    let body = tick(1).to_string().into_bytes();

    for path in [
        "/v1/sessions/a%2Fappend/append",
        "/v1/sessions/a%2Fb/append",
        "/v1/sessions/with%20space/append",
        "/v1/sessions/%C3%BC/append",
        "/v1/sessions/ses%00x/append",
    ] {
        let (status, response) = send_raw(
            &server,
            Method::POST,
            path,
            Some("application/json"),
            body.clone(),
        )
        .await;
        assert_error(
            status,
            &response,
            400,
            "invalid_request",
            &format!("POST {path}"),
        );
    }

    assert_eq!(
        last_seq(&server, "a").await,
        0,
        "no request reached session a"
    );
}

#[tokio::test]
async fn punctuated_ids_work_end_to_end() {
    let server = Server::start();
    let ids = [
        "...", ".a", "a.", "a:b", "-._:", "append", "tail", "a..b", "ses:acme",
    ];

    for id in ids {
        let (status, header) = create_session(&server, json!({"id": id})).await;
        assert_eq!(status, 201, "create {id:?}: {header}");

        let (status, body) = create_session(&server, json!({"id": id})).await;
        assert_error(
            status,
            &body,
            409,
            "session_exists",
            &format!("create {id:?} twice"),
        );

        let event = json!({"type": "t", "payload": {"id": id}, "actor": "agent:a"});
        let seq = append_ok(&server, id, event).await;
        assert_eq!(seq, 1, "first append to {id:?}");

        let frames = tail_collect(&server, id, 0, 1, Duration::from_secs(30)).await;
        assert_eq!(
            frames[0]["payload"],
            json!({"id": id}),
            "tail of {id:?} returns its own event"
        );
    }

    for id in ids {
        assert_eq!(
            last_seq(&server, id).await,
            1,
            "session {id:?} holds only its own event"
        );
    }
}

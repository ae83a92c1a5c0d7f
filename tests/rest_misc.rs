//! Health, metrics, routing errors.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn health_live_and_ready() {
    let server = Server::start();

    for path in ["/health/live", "/health/ready"] {
        let (status, body) = get_json(&server, path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        assert_eq!(body, json!({"status": "ok"}), "GET {path} body");
    }
}

#[tokio::test]
async fn unknown_route_is_json_404() {
    let server = Server::start();

    for path in [
        "/",
        "/v1",
        "/v1/nope",
        "/v2/sessions",
        "/v1/sessions/a/b/c",
        "/v1/sessions/a/nope",
    ] {
        let (status, body) = get_json(&server, path).await;
        assert_error(
            status,
            &body,
            404,
            "invalid_request",
            &format!("GET {path}"),
        );
    }
}

#[tokio::test]
async fn wrong_method_is_json_405() {
    let server = Server::start();
    create_ok(&server, "s").await;

    let cases = [
        (Method::GET, "/v1/sessions/s/append"),
        (Method::PUT, "/v1/sessions/s"),
        (Method::DELETE, "/v1/sessions/s"),
        (Method::POST, "/v1/sessions/s/tail"),
        (Method::POST, "/health/live"),
    ];
    for (method, path) in cases {
        let (status, body) = send_raw(&server, method.clone(), path, None, Vec::new()).await;
        assert_error(
            status,
            &body,
            405,
            "invalid_request",
            &format!("{method} {path}"),
        );
    }

    assert_eq!(
        last_seq(&server, "s").await,
        0,
        "rejected requests must not append"
    );
}

#[tokio::test]
async fn metrics_count_appends() {
    let server = Server::start();
    create_ok(&server, "m").await;
    append_ticks(&server, "m", 1, 3, 1).await;

    let before = metrics_text(&server).await;
    let appends_before = metric_sum(&before, "starcite_events_append_total")
        .unwrap_or_else(|| panic!("/metrics lacks starcite_events_append_total:\n{before}"));

    append_ticks(&server, "m", 4, 7, 2).await;

    // Reading a frame proves the tail is running, so the gauge is updated.
    let mut tail = tail_open(&server, "m", 0).await;
    read_until(&mut tail, 1, std::time::Duration::from_secs(30)).await;
    let after = metrics_text(&server).await;
    let appends_after = metric_sum(&after, "starcite_events_append_total")
        .unwrap_or_else(|| panic!("/metrics lacks starcite_events_append_total:\n{after}"));
    assert_eq!(
        appends_after - appends_before,
        7.0,
        "starcite_events_append_total must grow by the 7 appends made between scrapes"
    );
    for series in ["starcite_events_payload_bytes", "starcite_tail_connections"] {
        assert!(after.contains(series), "/metrics lacks {series}:\n{after}");
    }
}

/// Dashboards need every series from the start, not only after first use.
#[tokio::test]
async fn metrics_list_series_at_start() {
    let server = Server::start();
    let text = metrics_text(&server).await;

    for series in [
        "starcite_events_append_total",
        "starcite_events_payload_bytes",
        "starcite_tail_connections",
        "starcite_raft_shards_without_leader",
    ] {
        assert!(
            text.contains(series),
            "/metrics of a fresh server lacks {series}:\n{text}"
        );
    }
}

/// The Raft health gauges show every shard led once the server is ready.
#[tokio::test]
async fn metrics_show_raft_health() {
    let server = Server::start();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = metrics_text(&server).await;
        // Gauges are sampled every second, so the first sample may predate
        // the leader elections.
        let led = text
            .lines()
            .any(|line| line == "starcite_raft_shards_without_leader 0");
        if (led && text.contains("starcite_raft_applied_index{"))
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    assert!(
        text.lines()
            .any(|line| line == "starcite_raft_shards_without_leader 0"),
        "a ready single node has a leader for every shard:\n{text}"
    );
    assert!(
        text.contains("starcite_raft_applied_index{shard=\"0\"}"),
        "the applied index is reported per shard:\n{text}"
    );
}

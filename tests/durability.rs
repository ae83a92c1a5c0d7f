//! Acknowledged appends survive SIGKILL: after a restart every acked event
//! is present and unchanged, seqs stay gapless, keys keep deduping.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

const SESSIONS: u64 = 4;
const WRITERS_PER_SESSION: u64 = 2;

/// Acks to wait for before the kill; the wait is also bounded in time.
const ACKS_BEFORE_KILL: u64 = 2_000;

// NOTE: SIGKILL ends the process but leaves the page cache intact, so this
// proves the server acks only after its own writes completed, not that it
// fsyncs. A power-loss test needs a fault-injecting filesystem.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_keeps_acked_appends() {
    let mut server = Server::start();
    let sessions: Vec<String> = (0..SESSIONS).map(|s| format!("ses-crash-{s}")).collect();
    for session in &sessions {
        create_ok(&server, session).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for (index, session) in sessions.iter().enumerate() {
        for slot in 0..WRITERS_PER_SESSION {
            let writer = index as u64 * WRITERS_PER_SESSION + slot;
            handles.push(spawn_writer(
                &server,
                session,
                writer,
                1_000_000,
                stop.clone(),
                acked.clone(),
            ));
        }
    }

    let acked_at_kill = wait_for_acks(&acked, ACKS_BEFORE_KILL, Duration::from_secs(30)).await;
    server.kill9();
    let mut logs = Vec::new();
    for handle in handles {
        logs.push(handle.await.expect("writer task panicked"));
    }
    assert!(acked_at_kill > 0, "no append was acked before the kill");
    eprintln!("killed the server after {acked_at_kill} acks");

    server.restart();

    for session in &sessions {
        let session_logs: Vec<&WriterLog> =
            logs.iter().filter(|log| &log.session == session).collect();
        verify_recovered_session(&server, session, &session_logs).await;
    }
}

#[tokio::test]
async fn keys_survive_kill9() {
    let mut server = Server::start();
    create_ok(&server, "ses-keys").await;
    let keyed =
        json!({"type": "t", "payload": {"v": 1}, "actor": "agent:a", "idempotency_key": "k-1"});
    let (status, body) = append(&server, "ses-keys", keyed.clone()).await;
    assert_eq!(status, 201, "keyed append: {body}");
    append_ok(&server, "ses-keys", tick(2)).await;

    server.kill9();
    server.restart();

    let (status, body) = append(&server, "ses-keys", keyed).await;
    assert_eq!(status, 201, "retry after restart: {body}");
    assert_eq!(
        body,
        json!({"seq": 1, "last_seq": 2, "deduped": true}),
        "retry after restart"
    );

    let different =
        json!({"type": "t", "payload": {"v": 2}, "actor": "agent:a", "idempotency_key": "k-1"});
    let (status, body) = append(&server, "ses-keys", different).await;
    assert_error(
        status,
        &body,
        409,
        "idempotency_conflict",
        "reused key after restart",
    );

    let seq = append_ok(&server, "ses-keys", tick(3)).await;
    assert_eq!(seq, 3, "next append after restart");
}

#[tokio::test]
async fn sessions_survive_restart() {
    let mut server = Server::start();
    let (status, header) = create_session(
        &server,
        json!({"id": "ses-header", "title": "kept", "metadata": {"tenant": "acme"}}),
    )
    .await;
    assert_eq!(status, 201, "create: {header}");
    let (status, generated) = create_session(&server, json!({})).await;
    assert_eq!(status, 201, "create with a generated id: {generated}");
    let generated_id = generated["id"].as_str().expect("generated id").to_string();

    server.kill9();
    server.restart();

    let (status, fetched) = get_session(&server, "ses-header").await;
    assert_eq!(status, 200, "GET after restart: {fetched}");
    assert_eq!(fetched, header, "header after restart");
    let (status, fetched) = get_session(&server, &generated_id).await;
    assert_eq!(status, 200, "generated session after restart: {fetched}");

    let (status, body) = create_session(&server, json!({"id": "ses-header"})).await;
    assert_error(
        status,
        &body,
        409,
        "session_exists",
        "create an existing id after restart",
    );
}

//! SIGTERM: tails get close code 1001, in-flight appends finish or fail
//! cleanly, and the process exits 0 with everything acked kept.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_tail_with_1001() {
    let mut server = Server::start();
    create_ok(&server, "ses-term").await;
    append_ok(&server, "ses-term", tick(1)).await;

    let mut tail = tail_open(&server, "ses-term", 0).await;
    let replay = read_until(&mut tail, 1, Duration::from_secs(30)).await;
    assert_gapless(&replay, 1, 1, "replay before shutdown");
    let reader = tokio::spawn(async move { next_item(&mut tail, Duration::from_secs(30)).await });

    let status = tokio::task::block_in_place(|| server.sigterm());

    match reader.await.expect("tail reader panicked") {
        TailItem::Closed { code, reason } => {
            assert_eq!(
                code,
                Some(1001),
                "tail close code on shutdown (reason {reason:?})"
            )
        }
        other => panic!("expected a close frame on shutdown, got {other:?}"),
    }
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}; output:\n{}",
        server.logs()
    );
}

#[tokio::test]
async fn sigterm_when_idle_exits_zero() {
    let mut server = Server::start();
    let status = server.sigterm();
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}; output:\n{}",
        server.logs()
    );

    server.restart();
    let (status, _) = get_json(&server, "/health/ready").await;
    assert_eq!(status, 200, "ready after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_appends() {
    let mut server = Server::start();
    let sessions = ["ses-drain-0", "ses-drain-1"];
    for session in sessions {
        create_ok(&server, session).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for (index, session) in sessions.iter().enumerate() {
        for slot in 0..2 {
            let writer = index as u64 * 2 + slot;
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
    wait_for_acks(&acked, 500, Duration::from_secs(30)).await;

    let status = tokio::task::block_in_place(|| server.sigterm());
    let mut logs = Vec::new();
    for handle in handles {
        logs.push(handle.await.expect("writer task panicked"));
    }
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}; output:\n{}",
        server.logs()
    );

    for log in &logs {
        if let Some((status, body)) = &log.stopped_by {
            let body: Value = serde_json::from_str(body).unwrap_or(Value::String(body.clone()));
            assert_error(
                *status,
                &body,
                503,
                "unavailable",
                "append rejected during shutdown",
            );
        }
    }

    server.restart();
    for session in sessions {
        let session_logs: Vec<&WriterLog> =
            logs.iter().filter(|log| log.session == session).collect();
        verify_recovered_session(&server, session, &session_logs).await;
    }
}

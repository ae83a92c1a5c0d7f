//! Concurrent writers on one session get distinct, gapless seqs, and the
//! stored log matches the acks before and after a restart.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const WRITERS: u64 = 8;
const EVENTS_PER_WRITER: u64 = 8;
const TOTAL: u64 = WRITERS * EVENTS_PER_WRITER;
const READ_TIMEOUT: Duration = Duration::from_secs(30);

fn numbered_event(writer: u64, i: u64) -> Value {
    json!({"type": "w", "payload": {"writer": writer, "i": i}, "actor": format!("agent:w{writer}")})
}

/// Runs one writer on its own connection, appending its events in order.
async fn run_writer(server: &Server, id: &str, writer: u64) -> Vec<Ack> {
    let client = reqwest::Client::new();
    let mut acks = Vec::new();
    for i in 0..EVENTS_PER_WRITER {
        let event = numbered_event(writer, i);
        let (status, body) = append_with(&client, server, id, &event).await;
        assert_eq!(status, 201, "writer {writer} event {i}: {body}");
        let seq = body["seq"].as_u64().expect("append response has a seq");
        acks.push(Ack { seq, event });
    }
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_get_distinct_seqs() {
    let mut server = Server::start();
    create_ok(&server, "ses-writers").await;

    let writers = (0..WRITERS).map(|writer| run_writer(&server, "ses-writers", writer));
    let per_writer: Vec<Vec<Ack>> = futures_util::future::join_all(writers).await;

    for (writer, acks) in per_writer.iter().enumerate() {
        for pair in acks.windows(2) {
            assert!(
                pair[0].seq < pair[1].seq,
                "writer {writer}: seq {} acked before seq {}",
                pair[0].seq,
                pair[1].seq
            );
        }
    }

    let mut acks: Vec<Ack> = per_writer.into_iter().flatten().collect();
    acks.sort_by_key(|ack| ack.seq);
    let seqs: Vec<u64> = acks.iter().map(|ack| ack.seq).collect();
    let expected: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(seqs, expected, "acked seqs must be exactly 1..={TOTAL}");
    assert_eq!(
        last_seq(&server, "ses-writers").await,
        TOTAL,
        "last_seq after {TOTAL} appends"
    );

    let frames = tail_collect(&server, "ses-writers", 0, TOTAL, READ_TIMEOUT).await;
    assert_gapless(&frames, 1, TOTAL, "tail before restart");
    assert_frames_match_acks(&frames, &acks, "tail before restart");

    server.kill9();
    server.restart();

    assert_eq!(
        last_seq(&server, "ses-writers").await,
        TOTAL,
        "last_seq after restart"
    );
    let frames = tail_collect(&server, "ses-writers", 0, TOTAL, READ_TIMEOUT).await;
    assert_gapless(&frames, 1, TOTAL, "tail after restart");
    assert_frames_match_acks(&frames, &acks, "tail after restart");

    let seq = append_ok(&server, "ses-writers", tick(TOTAL + 1)).await;
    assert_eq!(seq, TOTAL + 1, "the next append after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_appends_get_distinct_seqs() {
    let server = Server::start();
    create_ok(&server, "ses-burst").await;

    let requests = (0..TOTAL).map(|n| {
        let server = &server;
        async move {
            let client = reqwest::Client::new();
            let event = numbered_event(n / EVENTS_PER_WRITER, n % EVENTS_PER_WRITER);
            let (status, body) = append_with(&client, server, "ses-burst", &event).await;
            assert_eq!(status, 201, "simultaneous append {n}: {body}");
            Ack {
                seq: body["seq"].as_u64().expect("seq"),
                event,
            }
        }
    });
    let mut acks = futures_util::future::join_all(requests).await;
    acks.sort_by_key(|ack| ack.seq);

    let seqs: Vec<u64> = acks.iter().map(|ack| ack.seq).collect();
    let expected: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(
        seqs, expected,
        "{TOTAL} simultaneous appends must get exactly 1..={TOTAL}"
    );

    let frames = tail_collect(&server, "ses-burst", 0, TOTAL, READ_TIMEOUT).await;
    assert_frames_match_acks(&frames, &acks, "tail of the burst");
}

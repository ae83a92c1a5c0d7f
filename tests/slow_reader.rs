//! A tail that stops reading neither slows another tail nor loses events:
//! once it reads again it gets every event in order on the same socket.

mod common;

use std::time::{Duration, Instant};

use common::*;

const EVENTS: u64 = 20_000;
/// Payload padding, so the backlog is far larger than the socket buffers.
const PAD: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_reader_does_not_block_fast() {
    // Keepalive and send timeouts far beyond the test, so the server keeps
    // the stalled socket instead of closing it.
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start_with(
        data_dir.path(),
        &[
            ("STARCITE_TAIL_PING_INTERVAL_MS", "600000"),
            ("STARCITE_TAIL_SEND_TIMEOUT_MS", "600000"),
        ],
    );
    create_ok(&server, "ses-slow").await;

    let mut slow = tail_open_small_buffer(&server, "ses-slow", 0, 4096).await;
    let mut fast = tail_open(&server, "ses-slow", 0).await;

    let started = Instant::now();
    let writer = async {
        let events = (1..=EVENTS).map(|n| padded_tick(n, PAD)).collect();
        append_all(&server, "ses-slow", events, 16).await;
        Instant::now()
    };
    let reader = async {
        let result = follow_gapless(
            &mut fast,
            0,
            EVENTS,
            Duration::from_secs(300),
            "fast reader",
        )
        .await;
        (result, Instant::now())
    };
    let (writer_done, (fast_result, fast_done)) = tokio::join!(writer, reader);

    if let Err(stopped) = fast_result {
        panic!("fast reader stopped early: {stopped:?}");
    }
    let lag = fast_done.saturating_duration_since(writer_done);
    eprintln!(
        "appended {EVENTS} events in {:?}; fast reader finished {lag:?} after the last ack",
        writer_done - started
    );
    assert!(
        lag < Duration::from_secs(30),
        "fast reader lagged {lag:?} behind the writer"
    );

    let result = follow_gapless(
        &mut slow,
        0,
        EVENTS,
        Duration::from_secs(300),
        "slow reader",
    )
    .await;
    if let Err(stopped) = result {
        panic!("slow reader did not get every event on its socket: {stopped:?}");
    }
}

//! The first frame after `cursor=k` is seq k+1, and a client that resumes
//! from the last seq it processed gets every event exactly once.

mod common;

use std::time::Duration;

use common::*;

const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn cursor_starts_at_next_seq() {
    let server = Server::start();
    create_ok(&server, "ses-cursor").await;
    append_ticks(&server, "ses-cursor", 1, 10, 1).await;

    for cursor in [0u64, 1, 5, 9] {
        let mut tail = tail_open(&server, "ses-cursor", cursor).await;
        let frames = read_for(&mut tail, Duration::from_secs(1)).await;
        assert_gapless(&frames, cursor + 1, 10, &format!("cursor={cursor}"));
    }

    let mut tail = tail_open(&server, "ses-cursor", 10).await;
    let frames = read_for(&mut tail, Duration::from_secs(1)).await;
    assert!(
        frames.is_empty(),
        "cursor=10 at last_seq 10 must replay nothing, got {frames:?}"
    );

    append_ok(&server, "ses-cursor", tick(11)).await;
    let frames = read_until(&mut tail, 11, READ_TIMEOUT).await;
    assert_gapless(&frames, 11, 11, "live append on the cursor=10 tail");
}

/// Number of events the reconnecting client must end up with.
const RECONNECT_EVENTS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_loop_gets_each_once() {
    let server = Server::start();
    create_ok(&server, "ses-reconnect").await;
    let mut rng = Rng::from_time("reconnect_loop_gets_each_once");

    let writer = append_ticks(&server, "ses-reconnect", 1, RECONNECT_EVENTS, 2);
    let reader = async {
        let mut processed: Vec<u64> = Vec::new();
        let mut connections = 0;
        while processed.last().copied().unwrap_or(0) < RECONNECT_EVENTS {
            let cursor = processed.last().copied().unwrap_or(0);
            let mut tail = tail_open(&server, "ses-reconnect", cursor).await;
            connections += 1;

            let budget = rng.range(1, 40);
            for _ in 0..budget {
                match next_item(&mut tail, READ_TIMEOUT).await {
                    TailItem::Event(frame) => processed.push(frame_seq(&frame)),
                    other => panic!("tail at cursor {cursor} ended early: {other:?}"),
                }
                if processed.last() == Some(&RECONNECT_EVENTS) {
                    break;
                }
            }

            // Half the time close politely, otherwise drop the socket.
            if rng.range(0, 1) == 0 {
                let _ = tail.close(None).await;
            }
        }
        (processed, connections)
    };

    let (acks, (processed, connections)) = tokio::join!(writer, reader);
    assert_eq!(acks.len() as u64, RECONNECT_EVENTS, "every append acked");
    assert!(
        connections > 1,
        "the client should have reconnected at least once"
    );

    let expected: Vec<u64> = (1..=RECONNECT_EVENTS).collect();
    assert_eq!(
        processed, expected,
        "after {connections} connections the client must hold each seq exactly once, in order"
    );
}

//! Many tails on one session: readers get every event in order with
//! bounded lag, a reader that pauses gets no seq jump, and a stalled socket is
//! either fed everything later or closed, never left open while skipping.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;

// NOTE: 200 sockets and 100,000 events took about 50 s against a release
// build on a 2-core machine. Lower both if CI runs much slower.
const SOCKETS: usize = 200;
const EVENTS: u64 = 100_000;
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_subscriber_isolated() {
    let server = Server::start();
    create_ok(&server, "ses-many").await;

    let mut stalled = tail_open_small_buffer(&server, "ses-many", 0, 4096).await;
    let mut readers = Vec::new();
    for _ in 0..SOCKETS - 2 {
        readers.push(tail_open(&server, "ses-many", 0).await);
    }
    let mut pausing = tail_open(&server, "ses-many", 0).await;
    let rss_before = server.rss_kib();

    let started = Instant::now();
    let writer = async {
        append_ticks(&server, "ses-many", 1, EVENTS, 16).await;
        Instant::now()
    };
    let followers = join_all(
        readers
            .iter_mut()
            .enumerate()
            .map(|(index, tail)| async move {
                let context = format!("reader {index}");
                let result = follow_gapless(tail, 0, EVENTS, FOLLOW_TIMEOUT, &context).await;
                (result, Instant::now())
            }),
    );
    let pauser = async {
        let first = EVENTS / 4;
        follow_gapless(&mut pausing, 0, first, FOLLOW_TIMEOUT, "pausing reader")
            .await
            .unwrap_or_else(|stopped| {
                panic!("pausing reader stopped before its pause: {stopped:?}")
            });
        tokio::time::sleep(Duration::from_secs(2)).await;
        follow_gapless(
            &mut pausing,
            first,
            EVENTS,
            FOLLOW_TIMEOUT,
            "pausing reader after 2 s pause",
        )
        .await
        .unwrap_or_else(|stopped| panic!("pausing reader stopped after its pause: {stopped:?}"));
    };
    let (writer_done, results, ()) = tokio::join!(writer, followers, pauser);

    let mut slowest = Duration::ZERO;
    for (index, (result, done)) in results.into_iter().enumerate() {
        if let Err(stopped) = result {
            panic!("reader {index} stopped early: {stopped:?}");
        }
        slowest = slowest.max(done.saturating_duration_since(writer_done));
    }
    let rss_after = server.rss_kib();
    eprintln!(
        "{EVENTS} events in {:?}; slowest reader finished {slowest:?} after the last ack; RSS {rss_before} -> {rss_after} KiB",
        writer_done - started
    );
    assert!(
        slowest < Duration::from_secs(60),
        "readers lagged {slowest:?} behind the writer"
    );
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 512,
        "server RSS grew by {growth_mib} MiB during the run"
    );

    // The stalled socket may have been kept or closed, but must not skip.
    let mut last = 0;
    let mut reconnects = 0;
    loop {
        let context = format!("stalled reader, connection {}", reconnects + 1);
        let result = follow_gapless(&mut stalled, last, EVENTS, FOLLOW_TIMEOUT, &context).await;
        match result {
            Ok(()) => break,
            Err(TailStopped {
                last_seq,
                item: TailItem::Closed { .. },
            }) if reconnects < 3 => {
                last = last_seq;
                reconnects += 1;
                stalled = tail_open_small_buffer(&server, "ses-many", last, 1 << 20).await;
            }
            Err(stopped) => panic!("stalled reader could not finish: {stopped:?}"),
        }
    }
    eprintln!("stalled reader finished after {reconnects} reconnects");
}

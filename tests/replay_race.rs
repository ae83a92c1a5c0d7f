//! Events appended while a tail replays history must still reach the tail:
//! the replay-to-live handover may not drop or repeat anything.

mod common;

use std::time::Duration;

use common::*;

/// Rounds of the race. Each round preloads 2,000 events and races 500 more
/// against the replay, with a random 0–50 ms head start for the tail.
const ROUNDS: u64 = 50;
const PRELOADED: u64 = 2_000;
const RACED: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_race_loses_nothing() {
    let server = Server::start();
    let mut rng = Rng::from_time("replay_race_loses_nothing");

    for round in 0..ROUNDS {
        let id = format!("ses-replay-race-{round}");
        create_ok(&server, &id).await;
        let mut acks = append_ticks(&server, &id, 1, PRELOADED, 16).await;
        let head_start = Duration::from_millis(rng.range(0, 50));

        let reader = async {
            let mut tail = tail_open(&server, &id, 0).await;
            read_until(&mut tail, PRELOADED + RACED, Duration::from_secs(60)).await
        };
        let writer = async {
            tokio::time::sleep(head_start).await;
            append_ticks(&server, &id, PRELOADED + 1, RACED, 4).await
        };
        let (frames, raced_acks) = tokio::join!(reader, writer);
        acks.extend(raced_acks);

        let context = format!("round {round}, writer started {head_start:?} after the tail");
        assert_gapless(&frames, 1, PRELOADED + RACED, &context);
        assert_frames_match_acks(&frames, &acks, &context);
    }
}

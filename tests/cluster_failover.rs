//! Failover on a real three-node cluster: a shard leader is killed with
//! SIGKILL while writers append, and every acknowledged event must then be
//! on every replica exactly once, at the seq it was acknowledged with.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{append_retrying, Cluster};
use common::{create_ok, frame_seq, last_seq, tail_collect};
use futures_util::StreamExt;
use serde_json::{json, Value};

const SHARDS: u32 = 8;
/// Maximum time a writer keeps retrying one append through a failover.
const PATIENCE: Duration = Duration::from_secs(30);

/// Acknowledged appends of one session: seq → the writer's event number.
type Acks = Arc<Mutex<BTreeMap<u64, u64>>>;

fn event(session: &str, i: u64) -> Value {
    json!({
        "type": "x",
        "payload": {"i": i},
        "actor": "agent:a",
        "idempotency_key": format!("{session}-{i}"),
    })
}

/// Appends events `0..count` to `session` with `concurrency` requests in
/// flight, spread over `targets` (API addresses), retrying each through
/// 503s with its idempotency key. Records every 201 in `acks`.
async fn write_all(
    session: String,
    count: u64,
    concurrency: usize,
    targets: Vec<String>,
    acks: Acks,
) {
    let client = reqwest::Client::new();
    futures_util::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let target = targets[i as usize % targets.len()].clone();
            let session = session.clone();
            let acks = acks.clone();
            async move {
                let (status, body) =
                    append_retrying(&client, &target, &session, &event(&session, i), PATIENCE)
                        .await;
                assert_eq!(
                    status, 201,
                    "append {i} to {session} via {target} failed: {body}"
                );
                let seq = body["seq"].as_u64().expect("append response has no seq");
                let previous = acks.lock().unwrap().insert(seq, i);
                assert!(
                    previous.is_none() || previous == Some(i),
                    "seq {seq} acknowledged for event {i} and for event {previous:?}"
                );
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
}

/// Waits until `acks` contains at least `count` entries, and fails after
/// `timeout`.
async fn wait_for_acks(acks: &Acks, count: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while acks.lock().unwrap().len() < count {
        assert!(
            Instant::now() < deadline,
            "fewer than {count} acks within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks one node's copy of `session`: seqs 1..=last without a gap, every
/// event number at most once, every acknowledged (seq, i) in place. Returns
/// the event numbers in seq order.
async fn check_replica(
    cluster: &Cluster,
    node: u64,
    session: &str,
    acks: &BTreeMap<u64, u64>,
) -> Vec<u64> {
    let server = cluster.node(node);
    let last = last_seq(server, session).await;
    let frames = tail_collect(server, session, 0, last, Duration::from_secs(60)).await;
    assert_eq!(
        frames.len() as u64,
        last,
        "node{node} delivered {} of {last} events of {session}",
        frames.len()
    );

    let mut seen = BTreeMap::new();
    let mut order = Vec::with_capacity(frames.len());
    for (position, frame) in frames.iter().enumerate() {
        let seq = frame_seq(frame);
        assert_eq!(
            seq,
            position as u64 + 1,
            "node{node}: {session} has a gap or reorder at {seq}"
        );
        let i = frame["payload"]["i"]
            .as_u64()
            .expect("frame without payload.i");
        if let Some(first) = seen.insert(i, seq) {
            panic!("node{node}: event {i} of {session} stored twice, at seq {first} and {seq}");
        }
        order.push(i);
    }
    for (seq, i) in acks {
        assert_eq!(
            order.get(*seq as usize - 1),
            Some(i),
            "node{node}: acknowledged event {i} of {session} is not at its seq {seq}"
        );
    }
    order
}

/// Checks that every replica has the same log of `session` and that it
/// contains every acknowledged append.
async fn check_every_replica(cluster: &Cluster, session: &str, acks: &Acks) {
    let acks = acks.lock().unwrap().clone();
    let mut logs = Vec::new();
    for node in 1..=cluster.nodes.len() as u64 {
        logs.push(check_replica(cluster, node, session, &acks).await);
    }
    for (index, log) in logs.iter().enumerate().skip(1) {
        assert_eq!(
            log,
            &logs[0],
            "node{} and node1 disagree on {session}",
            index + 1
        );
    }
}

/// Kills the leader of `session`'s shard after `kill_after` acks, restarts
/// it three seconds later, and returns (the killed node, the pause in
/// acknowledgements seen by the writers).
async fn kill_and_restart_leader(
    cluster: &mut Cluster,
    session: &str,
    acks: &Acks,
    kill_after: usize,
) -> (u64, Duration) {
    let leader = cluster
        .leader_of(session, SHARDS, Duration::from_secs(10))
        .await;
    wait_for_acks(acks, kill_after, Duration::from_secs(120)).await;

    let before = acks.lock().unwrap().len();
    let killed_at = Instant::now();
    cluster.node_mut(leader).kill9();

    let pause = longest_stall(acks, before + 200).await;
    eprintln!("leader node{leader} killed after {before} acks; acks stalled for at most {pause:?}");

    tokio::time::sleep(Duration::from_secs(3).saturating_sub(killed_at.elapsed())).await;
    let node = cluster.node_mut(leader);
    tokio::task::block_in_place(|| node.restart());
    (leader, pause)
}

/// Returns the longest time `acks` did not grow, watched until it contains
/// `until` entries. That is the write pause a client of this session saw.
async fn longest_stall(acks: &Acks, until: usize) -> Duration {
    let started = Instant::now();
    let mut count = acks.lock().unwrap().len();
    let mut changed = Instant::now();
    let mut longest = Duration::ZERO;
    while count < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = acks.lock().unwrap().len();
        if now != count {
            count = now;
            changed = Instant::now();
        }
        longest = longest.max(changed.elapsed());
        assert!(
            started.elapsed() < PATIENCE,
            "writes did not resume after the leader was killed"
        );
    }
    longest
}

/// Returns the API addresses of the nodes other than `leader`.
fn survivors(cluster: &Cluster, leader: u64) -> Vec<String> {
    (1..=cluster.nodes.len() as u64)
        .filter(|node| *node != leader)
        .map(|node| cluster.node(node).addr.to_string())
        .collect()
}

/// 20,000 appends to one session. The leader of its shard is killed after
/// about 5,000 acknowledgements and restarted 3 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_mid_burst_loses_no_acknowledged_append() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3, &[]));
    let session = "ses-burst";
    create_ok(cluster.node(1), session).await;

    let leader = cluster
        .leader_of(session, SHARDS, Duration::from_secs(10))
        .await;
    // Writers use the other nodes, so the kill also cuts forwarded writes
    // whose responses are lost. The clients retry those with the same key.
    let targets = survivors(&cluster, leader);
    let acks: Acks = Arc::default();
    let writer = tokio::spawn(write_all(
        session.to_string(),
        20_000,
        16,
        targets,
        acks.clone(),
    ));

    let (killed, pause) = kill_and_restart_leader(&mut cluster, session, &acks, 5_000).await;
    writer.await.expect("writer panicked");
    eprintln!("one session: killed node{killed}; writes paused for {pause:?}");

    assert_eq!(
        acks.lock().unwrap().len(),
        20_000,
        "every event must be acknowledged once"
    );
    check_every_replica(&cluster, session, &acks).await;
}

/// Several sessions on several shards are written at once, and the leader
/// of one of them dies. Every replica ends with every acknowledged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_during_concurrent_appends_on_several_sessions() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3, &[]));
    let sessions: Vec<String> = (0..4).map(|n| format!("ses-multi-{n}")).collect();
    for session in &sessions {
        create_ok(cluster.node(1), session).await;
    }

    let victim = cluster
        .leader_of(&sessions[0], SHARDS, Duration::from_secs(10))
        .await;
    let targets = survivors(&cluster, victim);
    let mut writers = Vec::new();
    let mut all_acks = Vec::new();
    for session in &sessions {
        let acks: Acks = Arc::default();
        writers.push(tokio::spawn(write_all(
            session.clone(),
            2_000,
            4,
            targets.clone(),
            acks.clone(),
        )));
        all_acks.push(acks);
    }

    let (killed, pause) =
        kill_and_restart_leader(&mut cluster, &sessions[0], &all_acks[0], 500).await;
    for writer in writers {
        writer.await.expect("writer panicked");
    }
    eprintln!("several sessions: killed node{killed}; writes paused for {pause:?}");

    for (session, acks) in sessions.iter().zip(&all_acks) {
        assert_eq!(
            acks.lock().unwrap().len(),
            2_000,
            "{session}: every event acknowledged once"
        );
        check_every_replica(&cluster, session, acks).await;
    }
}

//! A real multi-process cluster on loopback: any node serves any request,
//! tails work from every node, a restarted node catches up, and a node cut
//! off from its peers rejoins without diverging.

mod common;

use std::time::Duration;

use common::cluster::{free_ports, views_through_proxies, Cluster, Proxy};
use common::{
    append, append_ok, append_ticks, assert_error, assert_gapless, create_ok, create_session,
    frame_seq, get_session, last_seq, read_until, tail_collect, tail_open,
};
use serde_json::json;

const SHARDS: u32 = 8;
const TAIL_TIMEOUT: Duration = Duration::from_secs(60);

fn event(n: u64) -> serde_json::Value {
    json!({"type": "x", "payload": {"n": n}, "actor": "agent:a"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_request() {
    // A proxy in the environment (port 9 refuses connections) must not
    // capture peer traffic.
    let env = [
        ("HTTP_PROXY", "http://127.0.0.1:9"),
        ("http_proxy", "http://127.0.0.1:9"),
        ("ALL_PROXY", "http://127.0.0.1:9"),
    ];
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, &env));
    let id = "ses-any-node";
    create_ok(cluster.node(1), id).await;

    // One append through each node, each guarded by the seq it expects.
    for (index, node) in cluster.nodes.iter().enumerate() {
        let expected = index as u64;
        let mut body = event(expected);
        body["expected_seq"] = json!(expected);
        let seq = append_ok(node, id, body).await;
        assert_eq!(
            seq,
            expected + 1,
            "append through node{} got the wrong seq",
            index + 1
        );
    }

    // A stale guard is rejected whichever node receives it.
    let mut stale = event(99);
    stale["expected_seq"] = json!(1);
    let (status, body) = append(cluster.node(3), id, stale).await;
    assert_error(
        status,
        &body,
        409,
        "expected_seq_conflict",
        "stale guard through node 3",
    );

    // A key first used through node 1 dedupes through node 2.
    let mut keyed = event(7);
    keyed["idempotency_key"] = json!("cross-node");
    let first = append_ok(cluster.node(1), id, keyed.clone()).await;
    let (status, body) = append(cluster.node(2), id, keyed).await;
    assert_eq!(status, 201, "retry through node 2 failed: {body}");
    assert_eq!(
        body["deduped"],
        json!(true),
        "retry through node 2 was not deduped: {body}"
    );
    assert_eq!(
        body["seq"],
        json!(first),
        "retry through node 2 got another seq: {body}"
    );

    let (status, body) = create_session(cluster.node(3), json!({"id": id})).await;
    assert_error(
        status,
        &body,
        409,
        "session_exists",
        "create through node 3",
    );

    for (index, node) in cluster.nodes.iter().enumerate() {
        let (status, header) = get_session(node, id).await;
        assert_eq!(status, 200, "header through node{}: {header}", index + 1);
        assert_eq!(
            header["last_seq"],
            json!(4),
            "node{} reports another last_seq",
            index + 1
        );

        let frames = tail_collect(node, id, 0, 4, TAIL_TIMEOUT).await;
        assert_gapless(&frames, 1, 4, &format!("tail through node{}", index + 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_after_write_across_nodes() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(3, &[]));
    for n in 0..20 {
        let id = format!("ses-read-{n}");
        create_ok(cluster.node(1 + n % 3), &id).await;
        append_ok(cluster.node(1 + n % 3), &id, event(n)).await;
        let reader = cluster.node(1 + (n + 1) % 3);
        assert_eq!(
            last_seq(reader, &id).await,
            1,
            "{id} read through another node right after the write"
        );
    }
}

/// With four nodes and three replicas per shard, every session has a node
/// without a replica. A tail there is relayed from a replica and survives
/// that replica's death.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_on_non_replica_is_relayed() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(4, &[]));
    let id = "ses-relay";
    let shard = common::cluster::shard_of(id, SHARDS);
    // Shard s lives on the three nodes after position s % 4.
    let outsider = ((shard as u64 + 3) % 4) + 1;
    let server = cluster.node(outsider);
    create_ok(server, id).await;
    append_ticks(server, id, 1, 50, 4).await;

    let mut tail = tail_open(cluster.node(outsider), id, 10).await;
    let frames = read_until(&mut tail, 50, TAIL_TIMEOUT).await;
    assert_gapless(&frames, 11, 50, "relayed replay");

    // Kill the replica the relay most likely reads from (the leader).
    let leader = cluster.leader_of(id, SHARDS, Duration::from_secs(10)).await;
    assert_ne!(leader, outsider, "the outsider cannot lead the shard");
    cluster.node_mut(leader).kill9();

    let writer = (1..=4u64)
        .find(|node| *node != leader && *node != outsider)
        .expect("a third node");
    let client = reqwest::Client::new();
    let addr = cluster.node(writer).addr.to_string();
    for n in 51..=60 {
        let (status, body) = common::cluster::append_retrying(
            &client,
            &addr,
            id,
            &common::tick(n),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(status, 201, "append {n} after the kill: {body}");
    }

    let frames = read_until(&mut tail, 60, TAIL_TIMEOUT).await;
    assert_gapless(&frames, 51, 60, "relayed tail after the replica died");
    let _ = tail.close(None).await;
}

/// A node that was down while the log moved on far enough to be purged
/// catches up from a snapshot, then serves tails from its own replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_from_a_snapshot() {
    let env = [("STARCITE_SNAPSHOT_EVERY", "100")];
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3, &env));
    let id = "ses-catch-up";
    create_ok(cluster.node(1), id).await;
    append_ticks(cluster.node(1), id, 1, 100, 4).await;

    let leader = cluster.leader_of(id, SHARDS, Duration::from_secs(10)).await;
    let down = (1..=3u64).find(|node| *node != leader).expect("a follower");
    cluster.node_mut(down).kill9();

    // One append per Raft entry, so that the log passes many snapshots and
    // the purge that follows them.
    let writer = cluster.node(leader);
    for n in 101..=3_000 {
        append_ok(writer, id, common::tick(n)).await;
    }

    let node = cluster.node_mut(down);
    tokio::task::block_in_place(|| node.restart());
    let frames = tail_collect(cluster.node(down), id, 0, 3_000, TAIL_TIMEOUT).await;
    assert_gapless(&frames, 1, 3_000, "tail from the restarted node");

    let logs = cluster.node(down).logs();
    assert!(
        logs.contains("snapshot installed"),
        "the restarted node should have needed a snapshot; its log:\n{logs}"
    );
}

/// Every node killed at once and started again: the cluster forms again from
/// what each node has on disk, with every acknowledged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_killed_and_restarted_keeps_every_event() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3, &[]));
    let ids: Vec<String> = (0..6).map(|n| format!("ses-full-restart-{n}")).collect();
    for (n, id) in ids.iter().enumerate() {
        let node = cluster.node(1 + n as u64 % 3);
        create_ok(node, id).await;
        append_ticks(node, id, 1, 100, 4).await;
    }

    for node in &mut cluster.nodes {
        node.kill9();
    }
    // No node is ready before a majority of each of its shards runs, so
    // the nodes start together.
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            for node in &mut cluster.nodes {
                scope.spawn(move || node.restart());
            }
        })
    });

    for (n, id) in ids.iter().enumerate() {
        let reader = cluster.node(1 + (n as u64 + 1) % 3);
        assert_eq!(last_seq(reader, id).await, 100, "{id} after the restart");
        let seq = append_ok(cluster.node(1 + (n as u64 + 2) % 3), id, common::tick(101)).await;
        assert_eq!(seq, 101, "{id} continues after the restart");
        for node in 1..=3 {
            let frames = tail_collect(cluster.node(node), id, 0, 101, TAIL_TIMEOUT).await;
            assert_gapless(&frames, 1, 101, &format!("{id} through node{node}"));
        }
    }
}

/// A follower that missed tens of MiB of large events catches up. The
/// leader must send them in messages small enough to write in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_on_large_events() {
    let env = [("STARCITE_MAX_BODY_BYTES", "1048576")];
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3, &env));
    let id = "ses-large-catch-up";
    create_ok(cluster.node(1), id).await;
    let leader = cluster.leader_of(id, SHARDS, Duration::from_secs(10)).await;
    let down = (1..=3u64).find(|node| *node != leader).expect("a follower");
    cluster.node_mut(down).kill9();

    let filler = "x".repeat(900 * 1024);
    let events: Vec<serde_json::Value> = (1..=64)
        .map(|n| json!({"type": "big", "payload": {"n": n, "filler": filler}, "actor": "agent:a"}))
        .collect();
    common::append_all(cluster.node(leader), id, events, 16).await;

    let node = cluster.node_mut(down);
    tokio::task::block_in_place(|| node.restart());
    let frames = tail_collect(cluster.node(down), id, 0, 64, TAIL_TIMEOUT).await;
    assert_gapless(&frames, 1, 64, "tail from the node that caught up");
}

/// A follower cut off from every peer misses appends and then rejoins. It
/// must end with exactly the leader's log, and tails through it must see
/// every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_follower_rejoins_without_divergence() {
    let peer_ports = free_ports(3);
    let cut = 3;
    let (views, routes) = views_through_proxies(&peer_ports, cut);
    let mut proxies = Vec::new();
    for (listen, target) in routes {
        let target = format!("127.0.0.1:{target}").parse().expect("proxy target");
        proxies.push(Proxy::start(listen, target).await);
    }
    let cluster = tokio::task::block_in_place(|| Cluster::start_with_views(peer_ports, views, &[]));

    // A session whose shard node 3 does not lead, so the cut node is a follower.
    let id = (0..)
        .map(|n| format!("ses-partition-{n}"))
        .find(|id| common::cluster::shard_of(id, SHARDS) % 3 != (cut as u32 - 1))
        .expect("some id");
    create_ok(cluster.node(1), &id).await;
    append_ticks(cluster.node(1), &id, 1, 20, 4).await;
    let mut tail = tail_open(cluster.node(cut as u64), &id, 0).await;
    let frames = read_until(&mut tail, 20, TAIL_TIMEOUT).await;
    assert_gapless(&frames, 1, 20, "tail on the follower before the cut");

    for proxy in &proxies {
        proxy.block();
    }
    // The two connected nodes still form a majority.
    for n in 21..=300 {
        append_ok(cluster.node(1 + n % 2), &id, common::tick(n)).await;
    }
    let (status, body) = append(cluster.node(cut as u64), &id, common::tick(999)).await;
    assert_error(
        status,
        &body,
        503,
        "unavailable",
        "append through the cut node",
    );

    for proxy in &proxies {
        proxy.heal();
    }
    let frames = read_until(&mut tail, 300, TAIL_TIMEOUT).await;
    assert_gapless(&frames, 21, 300, "tail on the follower after it rejoined");
    let _ = tail.close(None).await;

    // After rejoining, the follower's replica equals the leader's.
    let reference = tail_collect(cluster.node(1), &id, 0, 300, TAIL_TIMEOUT).await;
    let rejoined = tail_collect(cluster.node(cut as u64), &id, 0, 300, TAIL_TIMEOUT).await;
    assert_eq!(
        rejoined, reference,
        "the rejoined follower's events differ from node 1's"
    );
    for frame in &rejoined {
        assert!(
            frame_seq(frame) <= 300,
            "an event the cluster rejected was stored: {frame}"
        );
    }
}

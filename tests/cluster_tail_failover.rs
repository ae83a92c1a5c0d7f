//! A client tailing through a node that dies reconnects to another node with
//! its last seq as cursor and continues without a gap or a duplicate.

mod common;

use std::time::Duration;

use common::cluster::{append_retrying, Cluster};
use common::{create_ok, frame_seq, last_seq, next_item, tail_open, TailItem};
use futures_util::StreamExt;

const SHARDS: u32 = 8;
const EVENTS: u64 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_resumes_on_another_node() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3, &[]));
    let id = "ses-tail-failover";
    create_ok(cluster.node(1), id).await;

    // The tail runs through the shard leader, the node that will die.
    let leader = cluster.leader_of(id, SHARDS, Duration::from_secs(10)).await;
    let survivor = (1..=3u64).find(|node| *node != leader).expect("a survivor");
    let writer_addr = cluster.node(survivor).addr.to_string();

    let writer = tokio::spawn(async move {
        let client = reqwest::Client::new();
        futures_util::stream::iter(1..=EVENTS)
            .map(|n| {
                let client = client.clone();
                let addr = writer_addr.clone();
                async move {
                    let mut event = common::tick(n);
                    event["idempotency_key"] = serde_json::json!(format!("tick-{n}"));
                    let (status, body) =
                        append_retrying(&client, &addr, id, &event, Duration::from_secs(30)).await;
                    assert_eq!(status, 201, "append {n} failed: {body}");
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
    });

    let mut seqs = Vec::new();
    let mut tail = tail_open(cluster.node(leader), id, 0).await;
    while seqs.len() < 500 {
        match next_item(&mut tail, Duration::from_secs(30)).await {
            TailItem::Event(frame) => seqs.push(frame_seq(&frame)),
            other => panic!("tail on node{leader} ended early: {other:?}"),
        }
    }
    cluster.node_mut(leader).kill9();

    // Drain what the dead node's socket still delivered, then reconnect.
    while let TailItem::Event(frame) = next_item(&mut tail, Duration::from_secs(5)).await {
        seqs.push(frame_seq(&frame));
    }
    let cursor = *seqs.last().expect("some events before the kill");
    writer.await.expect("writer panicked");

    let end = last_seq(cluster.node(survivor), id).await;
    let mut resumed = tail_open(cluster.node(survivor), id, cursor).await;
    while seqs.last() != Some(&end) {
        match next_item(&mut resumed, Duration::from_secs(30)).await {
            TailItem::Event(frame) => seqs.push(frame_seq(&frame)),
            other => panic!("resumed tail on node{survivor} ended early: {other:?}"),
        }
    }

    let expected: Vec<u64> = (1..=end).collect();
    assert_eq!(end, EVENTS, "every append was acknowledged once");
    assert_eq!(
        seqs, expected,
        "the tail across the failover must deliver 1..={end} exactly once, in order"
    );
}

//! Per-shard batching of client commands into Raft entries.
//!
//! openraft handles each `client_write` as its own log append and apply
//! step, so one request per entry spends most of its time in per-entry
//! overhead. The batcher keeps at most [`MAX_IN_FLIGHT`] entries in flight
//! per shard; requests that arrive meanwhile queue up and go out together
//! as one [`Command::Batch`]. An idle shard sends a lone request at once,
//! so batching adds no delay at low load. A batch goes to the shard's
//! leader wherever it is, see [`ShardRoute::write`].

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{error, info};

use super::route::{Refusal, ShardRoute};
use super::WriteError;
use crate::consensus::{Command, Outcome};

/// Raft entries one shard has in flight at most. One gave the largest
/// batches and the most appends per second with 64 writers on a two-core
/// machine: about 27,000/s, against 19,000/s with two or four entries (see
/// docs/benchmarks.md).
const MAX_IN_FLIGHT: usize = 1;
/// Commands in one batch at most.
const MAX_BATCH: usize = 1024;
/// Approximate size in bytes of commands at which a batch closes. It keeps
/// each Raft entry small enough to replicate within openraft's per-message
/// deadline, but a single larger request still goes alone.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Requests queued per shard before callers wait for room.
const QUEUE: usize = 8192;

/// Nodes on which a request may be carried out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// On the shard leader, wherever it is.
    Routed,
    /// Only here and only while this node leads, because a peer forwarded it.
    LocalOnly,
}

struct Request {
    command: Command,
    delivery: Delivery,
    reply: oneshot::Sender<Result<Outcome, Refusal>>,
}

/// Sends commands to one shard's leader, batching them under load.
#[derive(Clone)]
pub struct Batcher {
    sender: mpsc::Sender<Request>,
}

impl Batcher {
    /// Starts the batching task of the shard behind `route`.
    pub fn start(route: Arc<ShardRoute>) -> Batcher {
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(run(route, receiver));
        Batcher { sender }
    }

    /// Submits `command` and waits for its outcome from the shard leader.
    pub async fn write(&self, command: Command) -> Result<Outcome, WriteError> {
        self.submit(command, Delivery::Routed)
            .await
            .map_err(|refusal| match refusal {
                Refusal::Unavailable(reason) => WriteError::Unavailable(reason),
                Refusal::NotLeader { .. } => {
                    WriteError::Unavailable("the shard has no leader; retry shortly".to_string())
                }
            })
    }

    /// Submits a command that a peer forwarded. While this node leads the
    /// shard, the command is batched with this node's own requests. Otherwise
    /// it is rejected with `Refusal::NotLeader`, so that the peer looks for the
    /// leader itself and no command is forwarded in a circle.
    pub async fn write_local(&self, command: Command) -> Result<Outcome, Refusal> {
        self.submit(command, Delivery::LocalOnly).await
    }

    async fn submit(&self, command: Command, delivery: Delivery) -> Result<Outcome, Refusal> {
        let (reply, outcome) = oneshot::channel();
        let request = Request {
            command,
            delivery,
            reply,
        };
        if self.sender.send(request).await.is_err() {
            return Err(Refusal::Unavailable(
                "the shard is shutting down".to_string(),
            ));
        }
        outcome.await.unwrap_or_else(|_| {
            Err(Refusal::Unavailable(
                "the shard stopped before responding; the outcome is unknown, so retry with the same idempotency_key".to_string(),
            ))
        })
    }
}

async fn run(route: Arc<ShardRoute>, mut receiver: mpsc::Receiver<Request>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = receiver.recv().await {
        let Some(first) = refuse_if_not_leading(&route, first) else {
            continue;
        };
        // Waiting for a slot is what lets later requests pile up into a batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };

        let mut bytes = first.command.approx_size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Ok(request) = receiver.try_recv() else {
                break;
            };
            if let Some(request) = refuse_if_not_leading(&route, request) {
                bytes += request.command.approx_size();
                batch.push(request);
            }
        }

        let route = route.clone();
        tokio::spawn(async move {
            submit(&route, batch).await;
            drop(slot);
        });
    }
    info!(shard = route.shard(), "batcher stopped");
}

/// Rejects a forwarded request at once when this node does not lead, so that
/// it does not wait behind a batch this node forwards itself. Returns every
/// other request unchanged.
fn refuse_if_not_leading(route: &ShardRoute, request: Request) -> Option<Request> {
    if request.delivery == Delivery::LocalOnly && !route.leads() {
        let _ = request.reply.send(Err(Refusal::NotLeader {
            leader: route.leader(),
        }));
        return None;
    }
    Some(request)
}

/// Carries out one batch. While this node leads, the batch becomes one Raft
/// entry here. Otherwise the routed requests go to the leader as one command
/// and the forwarded ones are rejected with `Refusal::NotLeader`.
async fn submit(route: &ShardRoute, batch: Vec<Request>) {
    let batch = if route.leads() {
        match write_here(route, batch).await {
            Some(moved) => moved,
            None => return,
        }
    } else {
        batch
    };

    let (local, routed): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|request| request.delivery == Delivery::LocalOnly);
    for request in local {
        let _ = request.reply.send(Err(Refusal::NotLeader {
            leader: route.leader(),
        }));
    }
    if routed.is_empty() {
        return;
    }
    let (command, replies) = combine(routed);
    let outcome = route
        .write(Arc::new(command))
        .await
        .map_err(|WriteError::Unavailable(reason)| Refusal::Unavailable(reason));
    distribute(route.shard(), replies, outcome);
}

/// Writes the batch as one entry through the local Raft group. Returns the
/// requests again when leadership moved between the check and the write.
/// openraft then rejected the entry without appending it, so the requests
/// may be routed to the new leader.
async fn write_here(route: &ShardRoute, batch: Vec<Request>) -> Option<Vec<Request>> {
    let deliveries: Vec<Delivery> = batch.iter().map(|request| request.delivery).collect();
    let (command, replies) = combine(batch);
    let command = Arc::new(command);
    match route.write_here(command.clone()).await {
        Err(Refusal::NotLeader { .. }) => Some(split(command, deliveries, replies)),
        outcome => {
            distribute(route.shard(), replies, outcome);
            None
        }
    }
}

/// Takes a combined command apart again into its requests.
fn split(command: Arc<Command>, deliveries: Vec<Delivery>, replies: Vec<Reply>) -> Vec<Request> {
    let command = Arc::try_unwrap(command).unwrap_or_else(|shared| (*shared).clone());
    let commands = match command {
        Command::Batch(commands) if replies.len() > 1 => commands,
        single => vec![single],
    };
    commands
        .into_iter()
        .zip(deliveries)
        .zip(replies)
        .map(|((command, delivery), reply)| Request {
            command,
            delivery,
            reply,
        })
        .collect()
}

type Reply = oneshot::Sender<Result<Outcome, Refusal>>;

/// Merges requests into one command and returns it with their reply senders
/// in the same order. A lone command stays as it is, and several become a
/// [`Command::Batch`].
fn combine(mut batch: Vec<Request>) -> (Command, Vec<Reply>) {
    if batch.len() == 1 {
        let request = batch.remove(0);
        return (request.command, vec![request.reply]);
    }
    let (commands, replies) = batch
        .into_iter()
        .map(|request| (request.command, request.reply))
        .unzip();
    (Command::Batch(commands), replies)
}

/// Sends each request its part of the combined command's outcome.
fn distribute(shard: u32, mut replies: Vec<Reply>, outcome: Result<Outcome, Refusal>) {
    // A caller that stopped waiting has dropped its receiver, so send errors
    // are ignored.
    match outcome {
        Ok(outcome) if replies.len() == 1 => {
            let _ = replies.remove(0).send(Ok(outcome));
        }
        Ok(Outcome::Batch(outcomes)) if outcomes.len() == replies.len() => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Ok(other) => {
            error!(
                shard,
                count = replies.len(),
                ?other,
                "batch returned a mismatched outcome"
            );
            for reply in replies {
                let _ = reply.send(Err(Refusal::Unavailable(
                    "the shard returned an unexpected result".to_string(),
                )));
            }
        }
        Err(refusal) => {
            for reply in replies {
                let _ = reply.send(Err(refusal.clone()));
            }
        }
    }
}

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

use super::route::ShardRoute;
use super::WriteError;
use crate::consensus::{Command, Outcome};

/// Raft entries one shard has in flight at most. One gave the largest
/// batches and the most appends per second with 64 writers on a two-core
/// machine: about 27,000/s, against 19,000/s with two or four entries (see
/// docs/benchmarks.md).
const MAX_IN_FLIGHT: usize = 1;
/// Commands in one batch at most.
const MAX_BATCH: usize = 1024;
/// Requests queued per shard before callers wait for room.
const QUEUE: usize = 8192;

struct Request {
    command: Command,
    reply: oneshot::Sender<Result<Outcome, WriteError>>,
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

    /// Submits `command` and waits for its outcome.
    pub async fn write(&self, command: Command) -> Result<Outcome, WriteError> {
        let (reply, outcome) = oneshot::channel();
        let request = Request { command, reply };
        if self.sender.send(request).await.is_err() {
            return Err(WriteError::Unavailable(
                "the shard is shutting down".to_string(),
            ));
        }
        outcome.await.unwrap_or_else(|_| {
            Err(WriteError::Unavailable(
                "the shard stopped before responding".to_string(),
            ))
        })
    }
}

async fn run(route: Arc<ShardRoute>, mut receiver: mpsc::Receiver<Request>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = receiver.recv().await {
        // Waiting for a slot is what lets later requests pile up into a batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };

        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
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

async fn submit(route: &ShardRoute, mut batch: Vec<Request>) {
    if batch.len() == 1 {
        let request = batch.remove(0);
        let outcome = route.write(request.command).await;
        let _ = request.reply.send(outcome);
        return;
    }

    let (commands, replies): (Vec<Command>, Vec<_>) = batch
        .into_iter()
        .map(|request| (request.command, request.reply))
        .unzip();
    let count = commands.len();
    match route.write(Command::Batch(commands)).await {
        Ok(Outcome::Batch(outcomes)) if outcomes.len() == count => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // A caller that gave up waiting has dropped its receiver.
                let _ = reply.send(Ok(outcome));
            }
        }
        Ok(other) => {
            error!(
                shard = route.shard(),
                count,
                ?other,
                "batch returned a mismatched outcome"
            );
            for reply in replies {
                let _ = reply.send(Err(WriteError::Unavailable(
                    "the shard returned an unexpected result".to_string(),
                )));
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

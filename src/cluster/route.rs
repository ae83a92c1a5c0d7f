//! Routing of commands and header reads to the leader of one shard, wherever
//! it is.
//!
//! A node that hosts the shard reads the leader from openraft's metrics. A
//! node that does not keeps a leader hint, learned from the replicas it
//! contacts. A request that reaches a node which is not (or no longer) the
//! leader follows that node's hint and tries again until [`ROUTE_DEADLINE`]
//! runs out. Only responses that prove the command was not carried out are
//! retried. A forwarded write that got no response may have been applied, so
//! it fails with `503` and the client retries it with its idempotency key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::shard::Shard;
use super::WriteError;
use crate::consensus::state_machine::read_header;
use crate::consensus::transport::{CallError, Peers};
use crate::consensus::{Command, Outcome};
use crate::session::header::SessionHeader;
use crate::storage::Store;

/// Maximum time a request looks for a shard leader before it fails with
/// `503`. It covers detecting that the old leader is gone plus one election,
/// 2 to 3 s together with the Raft timings in `router::raft_config`.
const ROUTE_DEADLINE: Duration = Duration::from_secs(5);
/// Maximum time a write waits for commit, here or on the leader it was
/// forwarded to, before its outcome is reported as unknown. It also bounds
/// the leadership check before a header read.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum time a node waits for a peer's response to a forwarded request.
/// It is the leader's commit timeout plus a margin, so that the leader's more
/// specific timeout message arrives first.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(12);
/// Pause between two attempts to find a leader.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Reason a node did not carry out a request addressed to a shard leader.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Refusal {
    /// This node is not the leader. `leader` is the node it believes leads.
    NotLeader { leader: Option<u64> },
    /// The shard cannot serve the request, for the reason in the message.
    Unavailable(String),
}

/// Response of a peer to a forwarded request.
pub type PeerAnswer<T> = Result<T, Refusal>;

/// Result of one attempt to reach the leader.
enum Attempt<T> {
    Done(T),
    /// Certainly not carried out, so try again, at `leader` if one was named.
    Retry {
        leader: Option<u64>,
    },
    /// Final failure: the request was not carried out, or its outcome is
    /// unknown.
    Fail(WriteError),
}

impl<T> From<PeerAnswer<T>> for Attempt<T> {
    fn from(answer: PeerAnswer<T>) -> Attempt<T> {
        match answer {
            Ok(value) => Attempt::Done(value),
            Err(Refusal::NotLeader { leader }) => Attempt::Retry { leader },
            Err(Refusal::Unavailable(reason)) => Attempt::Fail(WriteError::Unavailable(reason)),
        }
    }
}

/// Returns the peer path of forwarded writes to shard `shard`.
pub fn write_path(shard: u32) -> String {
    format!("/_cluster/v1/shards/{shard}/write")
}

/// Returns the peer path of forwarded header reads of `session_id` in shard
/// `shard`.
pub fn header_path(shard: u32, session_id: &str) -> String {
    format!("/_cluster/v1/shards/{shard}/sessions/{session_id}")
}

/// Route to one shard's leader, through the local Raft group or the peer
/// port of the node that leads.
pub struct ShardRoute {
    shard: u32,
    local_id: u64,
    /// Raft group of the shard, when this node hosts a replica.
    local: Option<Shard>,
    replicas: Vec<u64>,
    /// Peer client, `None` on a single node.
    peers: Option<Peers>,
    store: Store,
    /// Last known leader, for shards this node does not host, or 0 if none.
    hint: AtomicU64,
    /// Leader that a peer named when it rejected a request, or 0 if none.
    /// The next attempt tries it once, even on a replica whose own view lags.
    named: AtomicU64,
}

impl ShardRoute {
    pub fn new(
        shard: u32,
        local_id: u64,
        local: Option<Shard>,
        replicas: Vec<u64>,
        peers: Option<Peers>,
        store: Store,
    ) -> ShardRoute {
        ShardRoute {
            shard,
            local_id,
            local,
            hint: AtomicU64::new(replicas.first().copied().unwrap_or(0)),
            named: AtomicU64::new(0),
            replicas,
            peers,
            store,
        }
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Returns the Raft group of this shard on this node, if it hosts one.
    pub fn local(&self) -> Option<&Shard> {
        self.local.as_ref()
    }

    /// Returns the leader in this node's view: openraft's on a replica, the
    /// hint elsewhere.
    pub fn leader(&self) -> Option<u64> {
        match &self.local {
            Some(shard) => shard.leader(),
            None => Some(self.hint.load(Ordering::Relaxed)).filter(|id| *id != 0),
        }
    }

    /// Returns whether this node currently leads the shard.
    pub fn leads(&self) -> bool {
        self.local.is_some() && self.leader() == Some(self.local_id)
    }

    fn learn(&self, leader: Option<u64>) {
        self.hint.store(leader.unwrap_or(0), Ordering::Relaxed);
    }

    /// Picks the replica to try next when no leader is known and stores it as
    /// the hint. It takes the replica after the last hint, so that every
    /// replica is tried in turn.
    fn next_guess(&self) -> u64 {
        let last = self.hint.load(Ordering::Relaxed);
        let position = self.replicas.iter().position(|id| *id == last);
        let next = match position {
            Some(index) => self.replicas[(index + 1) % self.replicas.len()],
            None => self.replicas[0],
        };
        self.hint.store(next, Ordering::Relaxed);
        next
    }

    /// Carries out `command` on the shard leader and returns its outcome.
    pub async fn write(&self, command: Arc<Command>) -> Result<Outcome, WriteError> {
        let deadline = Instant::now() + ROUTE_DEADLINE;
        loop {
            let attempt = match self.target() {
                Some(node) if node == self.local_id => {
                    Attempt::from(self.write_here(command.clone()).await)
                }
                Some(node) => self.forward_write(node, &command).await,
                None => Attempt::Retry { leader: None },
            };
            match attempt {
                Attempt::Done(outcome) => return Ok(outcome),
                Attempt::Fail(err) => return Err(err),
                Attempt::Retry { leader } => self.prepare_retry(leader, deadline).await?,
            }
        }
    }

    /// Reads a session header on the shard leader after it has confirmed that
    /// it still leads, so the header includes every acknowledged write.
    pub async fn read_header(&self, session_id: &str) -> Result<Option<SessionHeader>, WriteError> {
        if self.peers.is_none() {
            // A single node is always the leader of its shards.
            return self.read_store(session_id).map_err(WriteError::Unavailable);
        }
        let deadline = Instant::now() + ROUTE_DEADLINE;
        loop {
            let attempt = match self.target() {
                Some(node) if node == self.local_id => {
                    Attempt::from(self.read_header_here(session_id).await)
                }
                Some(node) => self.forward_read(node, session_id).await,
                None => Attempt::Retry { leader: None },
            };
            match attempt {
                Attempt::Done(header) => return Ok(header),
                Attempt::Fail(err) => return Err(err),
                Attempt::Retry { leader } => self.prepare_retry(leader, deadline).await?,
            }
        }
    }

    /// Chooses the node for the next attempt: a leader a peer just named,
    /// else openraft's view on a replica, else the hint. Returns `None` while
    /// a replica has no leader in view.
    fn target(&self) -> Option<u64> {
        let named = self.named.swap(0, Ordering::Relaxed);
        if named != 0 {
            return Some(named);
        }
        match &self.local {
            Some(shard) => shard.leader(),
            None => Some(self.leader().unwrap_or_else(|| self.next_guess())),
        }
    }

    /// Records the leader that a rejecting node named, or moves the hint on to
    /// the next replica, then waits briefly before the next attempt. Fails with
    /// `503` once the deadline has passed.
    async fn prepare_retry(
        &self,
        leader: Option<u64>,
        deadline: Instant,
    ) -> Result<(), WriteError> {
        if self.local.is_none() {
            match leader {
                Some(leader) => self.learn(Some(leader)),
                // No leader was named, so try the next replica.
                None => {
                    self.next_guess();
                }
            }
        }
        if Instant::now() >= deadline {
            warn!(shard = self.shard, "no leader found before the deadline");
            return Err(WriteError::Unavailable(format!(
                "shard {} has no reachable leader (an election may be in progress); retry shortly",
                self.shard
            )));
        }
        match (&self.local, leader) {
            // A peer named another leader. Try it next, after a short pause so
            // that two nodes naming each other do not spin.
            (_, Some(leader)) if leader != self.local_id => {
                self.named.store(leader, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A replica follows openraft's view of the leader, which changes
            // with the election, so wait until that view changes.
            (Some(shard), _) => {
                let mut metrics = shard.raft.metrics();
                metrics.borrow_and_update();
                let _ = tokio::time::timeout(RETRY_PAUSE, metrics.changed()).await;
            }
            (None, _) => tokio::time::sleep(RETRY_PAUSE).await,
        }
        Ok(())
    }

    /// Writes `command` through the local Raft group. Returns
    /// `Refusal::NotLeader` unless this node leads the shard.
    pub async fn write_here(&self, command: Arc<Command>) -> Result<Outcome, Refusal> {
        let Some(shard) = &self.local else {
            return Err(Refusal::NotLeader {
                leader: self.leader(),
            });
        };
        let written = tokio::time::timeout(COMMIT_TIMEOUT, shard.raft.client_write(command)).await;
        match written {
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                // openraft returns this for entries it never appended and
                // for entries that a new leader made it drop. With at most
                // three replicas (the configured maximum), a new leader without
                // the entry means that no other replica has it. The entry can
                // then never be committed, so a retry cannot apply it twice.
                debug!(shard = self.shard, leader = ?forward.leader_id, "not the leader");
                Err(Refusal::NotLeader {
                    leader: forward.leader_id,
                })
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(err)))) => {
                error!(shard = self.shard, error = %err, "unexpected membership error on a client write");
                Err(Refusal::Unavailable(format!(
                    "shard {} is changing membership; retry shortly",
                    self.shard
                )))
            }
            Ok(Err(RaftError::Fatal(fatal))) => {
                error!(shard = self.shard, error = %fatal, "shard stopped");
                Err(Refusal::Unavailable(format!(
                    "shard {} is stopped ({fatal}); the outcome of the write is unknown, \
                     so retry it with the same idempotency_key",
                    self.shard
                )))
            }
            Err(_) => {
                warn!(
                    shard = self.shard,
                    timeout_ms = COMMIT_TIMEOUT.as_millis() as u64,
                    "write not committed in time"
                );
                Err(Refusal::Unavailable(format!(
                    "shard {} did not commit the write within {} s (a majority of its replicas may be unreachable); its outcome is unknown, \
                     so retry it with the same idempotency_key",
                    self.shard,
                    COMMIT_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// Reads a session header from the local store after openraft confirms
    /// that this node still leads. Returns `Refusal::NotLeader` otherwise.
    pub async fn read_header_here(
        &self,
        session_id: &str,
    ) -> Result<Option<SessionHeader>, Refusal> {
        let Some(shard) = &self.local else {
            return Err(Refusal::NotLeader {
                leader: self.leader(),
            });
        };
        let confirmed =
            tokio::time::timeout(COMMIT_TIMEOUT, shard.raft.ensure_linearizable()).await;
        match confirmed {
            Ok(Ok(_)) => self.read_store(session_id).map_err(Refusal::Unavailable),
            Ok(Err(RaftError::APIError(err))) => match err {
                openraft::error::CheckIsLeaderError::ForwardToLeader(forward) => {
                    Err(Refusal::NotLeader {
                        leader: forward.leader_id,
                    })
                }
                openraft::error::CheckIsLeaderError::QuorumNotEnough(_) => {
                    Err(Refusal::NotLeader { leader: None })
                }
            },
            Ok(Err(RaftError::Fatal(fatal))) => Err(Refusal::Unavailable(format!(
                "shard {} is stopped: {fatal}",
                self.shard
            ))),
            Err(_) => Err(Refusal::Unavailable(format!(
                "shard {} could not confirm its leader within {} s; retry shortly",
                self.shard,
                COMMIT_TIMEOUT.as_secs()
            ))),
        }
    }

    fn read_store(&self, session_id: &str) -> Result<Option<SessionHeader>, String> {
        read_header(&self.store, session_id).map_err(|err| {
            error!(session_id, error = %err, "reading session header failed");
            format!("reading session {session_id:?} failed; retry shortly")
        })
    }

    async fn forward_write(&self, node: u64, command: &Arc<Command>) -> Attempt<Outcome> {
        let peers = self.peers.as_ref().expect("a remote leader implies peers");
        let answer = peers
            .post(node, &write_path(self.shard), command, FORWARD_TIMEOUT)
            .await;
        self.settle(node, answer, "write")
    }

    async fn forward_read(&self, node: u64, session_id: &str) -> Attempt<Option<SessionHeader>> {
        let peers = self.peers.as_ref().expect("a remote leader implies peers");
        let answer = peers
            .get(node, &header_path(self.shard, session_id), FORWARD_TIMEOUT)
            .await;
        self.settle(node, answer, "read")
    }

    /// Converts a peer's response into an attempt result and counts it in the
    /// forwarding metric. Undelivered and rejected requests are retried, but a
    /// missing response is final because the request may have been carried out.
    fn settle<T>(
        &self,
        node: u64,
        answer: Result<PeerAnswer<T>, CallError>,
        kind: &'static str,
    ) -> Attempt<T> {
        match answer {
            Ok(answer) => {
                crate::metrics::record_forward(kind, "answered");
                Attempt::from(answer)
            }
            Err(err @ (CallError::Unreachable { .. } | CallError::Refused { .. })) => {
                // Nothing was carried out there, so look for the leader again.
                crate::metrics::record_forward(kind, "not_delivered");
                debug!(shard = self.shard, node, error = %err, "forwarded {kind} not delivered; retrying");
                Attempt::Retry { leader: None }
            }
            Err(err @ CallError::NoAnswer { .. }) => {
                crate::metrics::record_forward(kind, "no_answer");
                warn!(shard = self.shard, node, error = %err, "forwarded {kind} got no response");
                let advice = if kind == "write" {
                    "the outcome is unknown, so retry with the same idempotency_key"
                } else {
                    "retry shortly"
                };
                Attempt::Fail(WriteError::Unavailable(format!(
                    "the leader of shard {} did not respond ({err}); {advice}",
                    self.shard
                )))
            }
        }
    }
}

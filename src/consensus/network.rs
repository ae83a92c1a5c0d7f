//! openraft's network for one shard, which sends its messages over [`Peers`]
//! to the peer routes of the target node.
//!
//! A node that is down or partitioned away is reported as unreachable, which
//! makes openraft back off before it tries again. A call that may have
//! arrived but got no response is a network error, which openraft retries
//! as well.

use std::time::Duration;

use openraft::error::PayloadTooLarge;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Entry, EntryPayload};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::debug;

use super::transport::{CallError, Peers};
use super::TypeConfig;

/// Maximum size in bytes of the entries in one append message. A single
/// larger entry still goes alone.
const APPEND_BUDGET: usize = 4 * 1024 * 1024;

/// Returns the number of entries to send instead when `rpc` is over
/// [`APPEND_BUDGET`], or `None` when it fits or carries a single entry.
fn entries_hint(rpc: &AppendEntriesRequest<TypeConfig>) -> Option<u64> {
    let count = rpc.entries.len();
    if count <= 1 {
        return None;
    }
    let size: usize = rpc.entries.iter().map(entry_size).sum();
    if size <= APPEND_BUDGET {
        return None;
    }
    let fitting = (count * APPEND_BUDGET / size).clamp(1, count - 1);
    Some(fitting as u64)
}

fn entry_size(entry: &Entry<TypeConfig>) -> usize {
    match &entry.payload {
        EntryPayload::Normal(command) => command.approx_size(),
        _ => 128,
    }
}

/// Returns the peer path of Raft message `message` of shard `shard`.
pub fn raft_path(shard: u32, message: &str) -> String {
    format!("/_cluster/v1/shards/{shard}/raft/{message}")
}

/// Factory of one client per target node for one shard's Raft messages.
#[derive(Clone)]
pub struct ShardNetwork {
    shard: u32,
    peers: Option<Peers>,
}

impl ShardNetwork {
    /// Creates the network for shard `shard`. `peers` is `None` on a single
    /// node, which has no peers and never sends a message.
    pub fn new(shard: u32, peers: Option<Peers>) -> ShardNetwork {
        ShardNetwork { shard, peers }
    }
}

/// Sends one shard's Raft messages to one node.
pub struct PeerClient {
    shard: u32,
    target: u64,
    peers: Option<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for ShardNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Self::Network {
        debug!(shard = self.shard, target, "raft client created");
        PeerClient {
            shard: self.shard,
            target,
            peers: self.peers.clone(),
        }
    }
}

impl PeerClient {
    /// Sends one Raft message and returns the peer's response, or the
    /// transport failure unchanged.
    async fn send<Req, Resp, E>(
        &self,
        message: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Result<Resp, RaftError<u64, E>>, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(peers) = &self.peers else {
            return Err(CallError::Unreachable {
                node: self.target,
                reason: "single-node mode has no peers".to_string(),
            });
        };
        let path = raft_path(self.shard, message);
        peers.post(self.target, &path, request, timeout).await
    }

    /// Maps a message's result to openraft's error kinds. A Raft error from the
    /// peer becomes a remote error. A connection that was never made is
    /// unreachable, so openraft backs off, and any other transport failure is
    /// a network error.
    fn settle<Resp, E>(
        &self,
        answer: Result<Result<Resp, RaftError<u64, E>>, CallError>,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        E: std::error::Error,
    {
        match answer {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(err @ CallError::Unreachable { .. }) => {
                Err(RPCError::Unreachable(Unreachable::new(&err)))
            }
            Err(err) => Err(RPCError::Network(NetworkError::new(&err))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        // openraft gives each append the heartbeat interval and retries the
        // same range after a failure, shrinking it only on PayloadTooLarge.
        // Without this check, a follower catching up would get a range too
        // large to transfer and fsync in time, resent forever.
        if let Some(hint) = entries_hint(&rpc) {
            debug!(
                shard = self.shard,
                target = self.target,
                entries = rpc.entries.len(),
                hint,
                "append too large; asking openraft for fewer entries"
            );
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        let entries = rpc.entries.len() as u64;
        let answer = self.send("append", &rpc, option.hard_ttl()).await;
        if let Err(CallError::Refused { status: 413, .. }) = &answer {
            if entries > 1 {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(entries / 2),
                ));
            }
        }
        self.settle(answer)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        let answer = self.send("snapshot", &rpc, option.hard_ttl()).await;
        self.settle(answer)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let answer = self.send("vote", &rpc, option.hard_ttl()).await;
        self.settle(answer)
    }
}

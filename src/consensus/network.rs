//! openraft's network for one shard: its messages travel over [`Peers`] to
//! the peer routes of the target node.
//!
//! A node that is down or partitioned away is reported as unreachable, which
//! makes openraft back off before it tries again; a call that may have
//! arrived but got no answer is a network error, retried by openraft as well.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::debug;

use super::transport::{CallError, Peers};
use super::TypeConfig;

/// Peer paths of the Raft messages of shard `shard`.
pub fn raft_path(shard: u32, message: &str) -> String {
    format!("/_cluster/v1/shards/{shard}/raft/{message}")
}

/// Creates a client per target node for one shard.
#[derive(Clone)]
pub struct ShardNetwork {
    shard: u32,
    peers: Option<Peers>,
}

impl ShardNetwork {
    /// A network for shard `shard`; `None` on a single node, which has no
    /// peers and never sends a message.
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
    async fn call<Req, Resp, E>(
        &self,
        message: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(peers) = &self.peers else {
            let reason = std::io::Error::other("single-node mode has no peers");
            return Err(RPCError::Unreachable(Unreachable::new(&reason)));
        };
        let path = raft_path(self.shard, message);
        let answer: Result<Result<Resp, RaftError<u64, E>>, CallError> =
            peers.post(self.target, &path, request, timeout).await;
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
        self.call("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}

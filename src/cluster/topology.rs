//! Cluster members and the nodes that host each shard.
//!
//! Members are named in `CLUSTER_NODES` as `name=host:port` pairs, where the
//! address is the node's peer port (Raft messages, forwarded requests and
//! relayed tails). Node ids are the 1-based positions of the names in sorted
//! order, so every node derives the same ids whatever order the list is
//! written in. The addresses may differ per node, for example when a node
//! reaches a peer through a proxy.
//!
//! Shard `s` lives on the `replication_factor` nodes that follow position
//! `s % n` in that order, and the first of them is its preferred leader, so
//! replicas and leaders spread evenly over the members.

use std::collections::BTreeMap;

/// A node id: 1 for the first name in sorted order.
pub type NodeId = u64;

/// One member of the cluster, with the address configured on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    /// Peer address, `host:port`.
    pub addr: String,
}

/// Cluster members, this node's id among them and the shard layout.
#[derive(Debug, Clone)]
pub struct Topology {
    local: NodeId,
    members: BTreeMap<NodeId, Member>,
    shards: u32,
    replication_factor: usize,
}

/// Error for an invalid `NODE_NAME`, `CLUSTER_NODES` or replication factor.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct TopologyError(String);

impl Topology {
    /// Creates the embedded default: one node that hosts every shard.
    pub fn single(shards: u32) -> Topology {
        let member = Member {
            id: 1,
            name: "local".to_string(),
            addr: String::new(),
        };
        Topology {
            local: 1,
            members: BTreeMap::from([(1, member)]),
            shards,
            replication_factor: 1,
        }
    }

    /// Parses `cluster_nodes` (`name=host:port,name=host:port,...`) and
    /// places `node_name` in it.
    pub fn parse(
        node_name: &str,
        cluster_nodes: &str,
        shards: u32,
        replication_factor: u32,
    ) -> Result<Topology, TopologyError> {
        let mut named = BTreeMap::new();
        for item in cluster_nodes
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (name, addr) = parse_member(item)?;
            if named.insert(name.clone(), addr).is_some() {
                return Err(TopologyError(format!(
                    "CLUSTER_NODES names {name:?} twice; every node needs its own name"
                )));
            }
        }
        if named.is_empty() {
            return Err(TopologyError(
                "CLUSTER_NODES is empty; list every node as name=host:port, separated by commas"
                    .to_string(),
            ));
        }
        if replication_factor == 0 {
            return Err(TopologyError(
                "the replication factor must be at least 1".to_string(),
            ));
        }

        let members: BTreeMap<NodeId, Member> = named
            .into_iter()
            .enumerate()
            .map(|(position, (name, addr))| {
                let id = position as NodeId + 1;
                (id, Member { id, name, addr })
            })
            .collect();
        check_distinct_addresses(&members)?;

        let local = members
            .values()
            .find(|member| member.name == node_name)
            .map(|member| member.id)
            .ok_or_else(|| {
                TopologyError(format!(
                    "NODE_NAME {node_name:?} is not in CLUSTER_NODES; add it or fix the name"
                ))
            })?;
        let replication_factor = (replication_factor as usize).min(members.len());
        Ok(Topology {
            local,
            members,
            shards,
            replication_factor,
        })
    }

    /// Returns whether this node is the only member (the embedded default).
    pub fn is_single(&self) -> bool {
        self.members.len() == 1
    }

    pub fn local_id(&self) -> NodeId {
        self.local
    }

    pub fn local(&self) -> &Member {
        &self.members[&self.local]
    }

    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.get(&id)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// Returns the nodes that host `shard`, its preferred leader first.
    pub fn replicas(&self, shard: u32) -> Vec<NodeId> {
        let count = self.members.len();
        (0..self.replication_factor)
            .map(|offset| ((shard as usize + offset) % count) as NodeId + 1)
            .collect()
    }

    /// Returns whether this node hosts a replica of `shard`.
    pub fn hosts(&self, shard: u32) -> bool {
        self.replicas(shard).contains(&self.local)
    }

    /// Returns a stable description of the settings that must not change once
    /// data exists: the member names, the shard count and the replication
    /// factor.
    pub fn layout(&self) -> String {
        let names: Vec<&str> = self.members.values().map(|m| m.name.as_str()).collect();
        format!(
            "members={} shards={} replication_factor={}",
            names.join(","),
            self.shards,
            self.replication_factor
        )
    }
}

fn parse_member(item: &str) -> Result<(String, String), TopologyError> {
    let Some((name, addr)) = item.split_once('=') else {
        return Err(TopologyError(format!(
            "CLUSTER_NODES entry {item:?} has no '='; write it as name=host:port"
        )));
    };
    let (name, addr) = (name.trim(), addr.trim());
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !name_ok {
        return Err(TopologyError(format!(
            "node name {name:?} is invalid; use 1 to 64 characters from A-Z a-z 0-9 . _ -"
        )));
    }
    let port_ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(TopologyError(format!(
            "address {addr:?} of node {name:?} is invalid; write it as host:port, for example 127.0.0.1:4100"
        )));
    }
    Ok((name.to_string(), addr.to_string()))
}

fn check_distinct_addresses(members: &BTreeMap<NodeId, Member>) -> Result<(), TopologyError> {
    let mut seen = BTreeMap::new();
    for member in members.values() {
        if let Some(other) = seen.insert(member.addr.as_str(), member.name.as_str()) {
            return Err(TopologyError(format!(
                "nodes {other:?} and {:?} share the address {}; each node needs its own peer port",
                member.name, member.addr
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE: &str = "n3=127.0.0.1:4102,n1=127.0.0.1:4100,n2=127.0.0.1:4101,\
                        n5=127.0.0.1:4104,n4=127.0.0.1:4103";

    #[test]
    fn ids_follow_sorted_names() {
        let topology = Topology::parse("n3", FIVE, 8, 3).unwrap();
        assert_eq!(topology.local_id(), 3);
        assert_eq!(topology.member(1).unwrap().name, "n1");
        assert_eq!(topology.local().addr, "127.0.0.1:4102");
    }

    #[test]
    fn replicas_and_leaders_spread_evenly() {
        let topology = Topology::parse("n1", FIVE, 10, 3).unwrap();
        let mut replicas_per_node = BTreeMap::<NodeId, usize>::new();
        let mut preferred = BTreeMap::<NodeId, usize>::new();
        for shard in 0..10 {
            let replicas = topology.replicas(shard);
            assert_eq!(replicas.len(), 3);
            *preferred.entry(replicas[0]).or_default() += 1;
            for node in replicas {
                *replicas_per_node.entry(node).or_default() += 1;
            }
        }
        assert!(
            replicas_per_node.values().all(|count| *count == 6),
            "replicas per node: {replicas_per_node:?}"
        );
        assert!(
            preferred.values().all(|count| *count == 2),
            "preferred leaders per node: {preferred:?}"
        );
    }

    #[test]
    fn replication_factor_is_capped_by_members() {
        let topology = Topology::parse("a", "a=h:1,b=h:2", 4, 3).unwrap();
        assert_eq!(topology.replication_factor(), 2);
        assert!((0..4).all(|shard| topology.hosts(shard)));
    }

    #[test]
    fn invalid_lists_are_rejected_with_the_reason() {
        let cases = [
            ("a", "", "empty"),
            ("a", "a=h:1,a=h:2", "twice"),
            ("a", "a", "no '='"),
            ("a", "a=h", "host:port"),
            ("a", "a=h:0", "host:port"),
            ("a", "a b=h:1", "invalid"),
            ("c", "a=h:1,b=h:2", "not in CLUSTER_NODES"),
            ("a", "a=h:1,b=h:1", "share the address"),
        ];
        for (name, nodes, expected) in cases {
            let err = Topology::parse(name, nodes, 8, 3).unwrap_err();
            assert!(err.0.contains(expected), "{nodes:?}: {err}");
        }
    }

    #[test]
    fn layout_ignores_addresses_and_order() {
        let n1_view = Topology::parse("n1", FIVE, 8, 3).unwrap();
        let n2_view = Topology::parse("n2", "n5=h:5,n4=h:4,n3=h:3,n2=h:2,n1=h:1", 8, 3).unwrap();
        assert_eq!(
            n1_view.layout(),
            n2_view.layout(),
            "layouts of two views that differ only in addresses and order"
        );
    }
}

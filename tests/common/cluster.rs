//! A real multi-process cluster on loopback, and a TCP proxy that can cut a
//! node off from its peers.
//!
//! Each node is a [`Server`] with its own data directory and API port. Free
//! peer ports are picked before the nodes start, because `CLUSTER_NODES` on
//! every node must list them all.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{metrics_text, read_json, session_path, Server};

/// Nodes of one test cluster. The node at index `i` is named `node{i+1}`.
pub struct Cluster {
    pub nodes: Vec<Server>,
    /// Peer port of each node, by index.
    pub peer_ports: Vec<u16>,
    _dirs: Vec<TempDir>,
}

/// Ports handed out for peer addresses: below Linux's default ephemeral
/// range (32768 to 60999), so no listener on port 0 and no outgoing
/// connection of a concurrent test can take one between the check below
/// and the node binding it.
const PEER_PORTS: std::ops::Range<u32> = 20_000..32_000;

/// Next candidate in [`PEER_PORTS`], shared by every test of this binary so
/// that concurrent tests get distinct ports. Zero until first used.
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// Finds `count` free loopback ports for nodes to bind later.
pub fn free_ports(count: usize) -> Vec<u16> {
    let span = PEER_PORTS.end - PEER_PORTS.start;
    // Each process starts at its own place, so that runs on one machine
    // seldom try the same ports.
    let _ = NEXT_PORT.compare_exchange(
        0,
        std::process::id() % span + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let mut ports = Vec::with_capacity(count);
    while ports.len() < count {
        let candidate = PEER_PORTS.start + NEXT_PORT.fetch_add(1, Ordering::SeqCst) % span;
        let port = candidate as u16;
        if StdTcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// Builds `CLUSTER_NODES` for nodes reachable at `ports`, where index `i` is
/// node `i+1`.
pub fn member_list(ports: &[u16]) -> String {
    ports
        .iter()
        .enumerate()
        .map(|(index, port)| format!("node{}=127.0.0.1:{port}", index + 1))
        .collect::<Vec<_>>()
        .join(",")
}

impl Cluster {
    /// Starts `count` nodes that reach each other directly.
    pub fn start(count: usize, env: &[(&str, &str)]) -> Cluster {
        let ports = free_ports(count);
        let views = vec![member_list(&ports); count];
        Cluster::start_with_views(ports, views, env)
    }

    /// Starts one node per peer port, the node at index `i` with `views[i]`
    /// as its `CLUSTER_NODES`, so that a node may reach a peer through a
    /// proxy. All nodes start at once, because none is ready before its
    /// shards have leaders.
    pub fn start_with_views(
        peer_ports: Vec<u16>,
        views: Vec<String>,
        env: &[(&str, &str)],
    ) -> Cluster {
        let dirs: Vec<TempDir> = (0..peer_ports.len())
            .map(|_| {
                tempfile::Builder::new()
                    .prefix("starcite-cluster-")
                    .tempdir()
                    .expect("failed to create a node data directory")
            })
            .collect();

        let nodes = std::thread::scope(|scope| {
            let handles: Vec<_> = dirs
                .iter()
                .zip(&views)
                .enumerate()
                .map(|(index, (dir, view))| {
                    let name = format!("node{}", index + 1);
                    let mut node_env: Vec<(&str, &str)> = vec![
                        ("NODE_NAME", name.as_str()),
                        ("CLUSTER_NODES", view.as_str()),
                    ];
                    node_env.extend_from_slice(env);
                    let env: Vec<(String, String)> = node_env
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    let path = dir.path().to_path_buf();
                    scope.spawn(move || {
                        let env: Vec<(&str, &str)> =
                            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        Server::start_with(&path, &env)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("a node failed to start"))
                .collect()
        });

        Cluster {
            nodes,
            peer_ports,
            _dirs: dirs,
        }
    }

    /// Returns the node with the 1-based id `id`.
    pub fn node(&self, id: u64) -> &Server {
        &self.nodes[id as usize - 1]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Server {
        &mut self.nodes[id as usize - 1]
    }

    /// Returns everything every node printed, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(index, node)| format!("==== node{} ====\n{}", index + 1, node.logs()))
            .collect()
    }

    /// Returns the leader of the shard that contains `session_id`, as the
    /// metrics of a running replica report it. Waits up to `timeout` for a
    /// leader that is running.
    pub async fn leader_of(&self, session_id: &str, shards: u32, timeout: Duration) -> u64 {
        let shard = shard_of(session_id, shards);
        let deadline = Instant::now() + timeout;
        loop {
            for node in &self.nodes {
                if !node.is_running() {
                    continue;
                }
                let text = metrics_text(node).await;
                if let Some(leader) = leader_in_metrics(&text, shard) {
                    if leader != 0 && self.nodes[leader as usize - 1].is_running() {
                        return leader;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader for shard {shard} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Returns the shard the server assigns `session_id` to: XXH3 (seed 0)
/// modulo the shard count.
pub fn shard_of(session_id: &str, shards: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(session_id.as_bytes()) % u64::from(shards)) as u32
}

fn leader_in_metrics(text: &str, shard: u32) -> Option<u64> {
    let prefix = format!("starcite_raft_leader_node{{shard=\"{shard}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
}

/// Appends `event` through `server`, retrying on `503` and on connection
/// errors for up to `patience`, as a client riding out a failover would.
/// Returns the final status and body.
pub async fn append_retrying(
    client: &reqwest::Client,
    server_addr: &str,
    id: &str,
    event: &Value,
    patience: Duration,
) -> (u16, Value) {
    let url = format!("http://{server_addr}{}/append", session_path(id));
    let deadline = Instant::now() + patience;
    loop {
        let sent = client
            .post(&url)
            .json(event)
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        match sent {
            Ok(response) => {
                let (status, body) = read_json(response).await;
                if status != 503 || Instant::now() >= deadline {
                    return (status, body);
                }
            }
            Err(err) if Instant::now() >= deadline => {
                return (0, json!({"error": "transport", "message": err.to_string()}));
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy whose traffic can be cut: while blocked it drops every open
/// connection and closes new ones at once.
pub struct Proxy {
    pub addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (a free loopback port) and forwards to `target`.
    pub async fn start(listen: u16, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", listen))
            .await
            .expect("binding the proxy port failed");
        let addr = listener.local_addr().expect("proxy has no address");
        let blocked = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));

        let accept = tokio::spawn(accept_loop(
            listener,
            target,
            blocked.clone(),
            connections.clone(),
        ));
        Proxy {
            addr,
            blocked,
            connections,
            accept,
        }
    }

    /// Cuts every open connection and closes new ones until [`Proxy::heal`].
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn heal(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    blocked: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        if blocked.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let handle = tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
        let mut open = connections.lock().unwrap();
        open.retain(|connection| !connection.is_finished());
        open.push(handle);
    }
}

/// Builds per-node `CLUSTER_NODES` views in which every message between
/// node `cut` (1-based) and any other node passes through a proxy. Returns
/// the views and, for each proxy, its listen port and target peer port.
pub fn views_through_proxies(peer_ports: &[u16], cut: usize) -> (Vec<String>, Vec<(u16, u16)>) {
    let count = peer_ports.len();
    let mut proxies = Vec::new();
    // Port other nodes use to reach `cut`.
    let to_cut = free_ports(1)[0];
    proxies.push((to_cut, peer_ports[cut - 1]));
    // Ports `cut` uses to reach each other node.
    let mut from_cut = BTreeMap::new();
    for other in (1..=count).filter(|other| *other != cut) {
        let port = free_ports(1)[0];
        proxies.push((port, peer_ports[other - 1]));
        from_cut.insert(other, port);
    }

    let views = (1..=count)
        .map(|viewer| {
            (1..=count)
                .map(|member| {
                    let port = if viewer == cut && member != cut {
                        from_cut[&member]
                    } else if viewer != cut && member == cut {
                        to_cut
                    } else {
                        peer_ports[member - 1]
                    };
                    format!("node{member}=127.0.0.1:{port}")
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    (views, proxies)
}

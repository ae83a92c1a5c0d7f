//! Cluster settings that cannot work are rejected at start with a message
//! that names the setting.

mod common;

use common::cluster::{free_ports, member_list};
use common::Server;

/// Starts a server that must exit with an error, and returns its output.
fn expect_start_failure(data_dir: &std::path::Path, env: &[(&str, &str)]) -> String {
    match Server::try_start_with(data_dir, env) {
        Ok(_) => panic!("the server started with {env:?}"),
        Err(failure) => {
            assert!(
                failure.status.is_some_and(|status| !status.success()),
                "the server should exit with an error, got {:?}; output:\n{}",
                failure.status,
                failure.logs
            );
            failure.logs
        }
    }
}

#[test]
fn cluster_nodes_without_node_name_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let members = member_list(&free_ports(3));
    let logs = expect_start_failure(dir.path(), &[("CLUSTER_NODES", &members)]);
    assert!(
        logs.contains("NODE_NAME"),
        "the error should name NODE_NAME:\n{logs}"
    );
}

#[test]
fn node_name_missing_from_the_list_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let members = member_list(&free_ports(3));
    let logs = expect_start_failure(
        dir.path(),
        &[("NODE_NAME", "node9"), ("CLUSTER_NODES", &members)],
    );
    assert!(
        logs.contains("not in CLUSTER_NODES"),
        "the error should say that NODE_NAME is not in CLUSTER_NODES:\n{logs}"
    );
}

#[test]
fn malformed_member_list_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let logs = expect_start_failure(
        dir.path(),
        &[("NODE_NAME", "node1"), ("CLUSTER_NODES", "node1=127.0.0.1")],
    );
    assert!(
        logs.contains("host:port"),
        "the error should show the expected host:port form:\n{logs}"
    );
}

/// A single node's data directory cannot silently become a cluster member,
/// because its Raft groups have only that node as a member.
#[test]
fn data_directory_of_another_layout_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut single = Server::start_with(dir.path(), &[]);
    let status = single.sigterm();
    assert!(status.success(), "the single node did not stop cleanly");

    let members = member_list(&free_ports(3));
    let logs = expect_start_failure(
        dir.path(),
        &[("NODE_NAME", "node1"), ("CLUSTER_NODES", &members)],
    );
    assert!(
        logs.contains("belongs to a cluster with"),
        "the error should explain the layout mismatch:\n{logs}"
    );
}

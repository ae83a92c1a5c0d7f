//! Two processes must never share a data directory: each would acknowledge
//! appends that the other later overwrites.

mod common;

use common::*;

#[tokio::test]
async fn second_process_on_same_dir_fails() {
    let first = Server::start();
    create_ok(&first, "locked").await;

    let failure = match Server::try_start_with(&first.data_dir(), &[]) {
        Ok(_) => panic!("a second server started on a data directory that is in use"),
        Err(failure) => failure,
    };

    let status = failure
        .status
        .expect("the second server should exit, not hang");
    assert!(
        !status.success(),
        "the second server exited with success: {status:?}"
    );
    assert!(
        failure.logs.contains("in use by another starcite process"),
        "the error should say the directory is in use: {}",
        failure.logs
    );

    let (status, _) = append(&first, "locked", tick(1)).await;
    assert_eq!(
        status, 201,
        "the first server keeps serving after the refused start"
    );
}

#[tokio::test]
async fn lock_is_released_after_kill() {
    let mut server = Server::start();
    create_ok(&server, "relock").await;
    server.kill9();

    server.restart();
    let (status, _) = append(&server, "relock", tick(1)).await;
    assert_eq!(status, 201, "a restart after kill -9 gets the lock back");
}

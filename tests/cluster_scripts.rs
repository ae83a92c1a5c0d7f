//! The local-cluster scripts, run exactly as a developer would: start five
//! nodes on ports 4000 to 4004, run the cluster checks and the failover
//! check, stop the nodes.
//!
//! The scripts use fixed ports, so this is the only test in this binary and
//! nothing else may listen on 4000 to 4004 or 4100 to 4104 meanwhile.

use std::path::Path;
use std::process::Command;

/// Runs `script` from the repository root with the cluster folder and the
/// binary under test, and returns its combined output. Panics if the script
/// fails.
fn run(script: &str, cluster_dir: &Path) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("bash")
        .arg(Path::new(root).join("scripts").join(script))
        .current_dir(root)
        .env("STARCITE_CLUSTER_DIR", cluster_dir)
        .env("STARCITE_BIN", env!("CARGO_BIN_EXE_starcite"))
        .env("NODES", "5")
        .output()
        .unwrap_or_else(|err| panic!("running {script} failed: {err}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{text}",
        output.status
    );
    text
}

/// Stops the cluster even when a check panics, so no node outlives the test.
struct StopOnDrop<'a>(&'a Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let root = env!("CARGO_MANIFEST_DIR");
        let _ = Command::new("bash")
            .arg(Path::new(root).join("scripts/stop-cluster.sh"))
            .env("STARCITE_CLUSTER_DIR", self.0)
            .status();
    }
}

#[test]
fn local_cluster_scripts_pass() {
    let folder = tempfile::Builder::new()
        .prefix("starcite-scripts-")
        .tempdir()
        .expect("failed to create the cluster folder");
    let dir = folder.path().join("cluster");
    let _stop = StopOnDrop(&dir);

    let started = run("start-cluster.sh", &dir);
    assert!(
        started.contains("cluster ready"),
        "start-cluster.sh output:\n{started}"
    );

    let checked = run("test-cluster.sh", &dir);
    eprintln!("{checked}");

    let failover = run("test-failover.sh", &dir);
    eprintln!("{failover}");

    run("stop-cluster.sh", &dir);
}

//! Runs the README's first-session walkthrough exactly as written: the
//! commands are read out of README.md and run with bash against a real
//! server listening on the README's port, 4000.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Returns the bash block that follows `<!-- readme-test: NAME -->`.
fn readme_block(readme: &str, name: &str) -> String {
    let marker = format!("<!-- readme-test: {name} -->");
    let start = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker} marker"));
    let after = &readme[start + marker.len()..];
    let fence = after
        .find("```bash\n")
        .expect("a bash block follows the marker")
        + "```bash\n".len();
    let body = &after[fence..];
    let end = body.find("```").expect("the bash block is closed");
    body[..end].to_string()
}

/// Kills the child on drop, so a failed assertion leaves no process behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(data_dir: &Path) -> Guard {
    let mut child = Command::new(env!("CARGO_BIN_EXE_starcite"))
        .env("PORT", "4000")
        .env("STARCITE_HOST", "127.0.0.1")
        .env("STARCITE_RAFT_DATA_DIR", data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the server binary");

    // Drain the log so the server never blocks on a full pipe.
    let stdout = child.stdout.take().expect("server stdout is piped");
    std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});

    let mut guard = Guard(child);
    wait_ready();

    // Another process already on port 4000 would answer in place of ours.
    let exited = guard.0.try_wait().expect("checking the server process");
    assert!(
        exited.is_none(),
        "the server exited ({exited:?}); is another process using port 4000?"
    );
    guard
}

fn wait_ready() {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let status = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:4000/health/ready",
            ])
            .output()
            .expect("running curl");
        if status.stdout == b"200" {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the server did not become ready on port 4000 within 30 s; is another process using the port?");
}

/// Runs a README block with bash in `workdir` and returns its stdout as JSON.
fn run_json(block: &str, workdir: &Path) -> Value {
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", block])
        .current_dir(workdir)
        .output()
        .expect("running bash");
    assert!(
        output.status.success(),
        "block failed: {block}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "block printed no JSON ({err}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A directory laid out like the repository root after a release build, so
/// `./target/release/starcite-tail` resolves whatever CARGO_TARGET_DIR is.
fn workdir_with_tail_binary(root: &Path) -> PathBuf {
    let release = root.join("target/release");
    std::fs::create_dir_all(&release).expect("creating target/release");
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_starcite-tail"),
        release.join("starcite-tail"),
    )
    .expect("linking starcite-tail");
    root.to_path_buf()
}

#[test]
fn readme_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("reading README.md");
    let scratch = tempfile::tempdir().expect("creating a temp dir");
    let workdir = workdir_with_tail_binary(&scratch.path().join("repo"));
    let _server = start_server(&scratch.path().join("data"));

    let created = run_json(&readme_block(&readme, "create"), &workdir);
    assert_eq!(created["id"], "ses_demo");
    assert_eq!(created["last_seq"], 0);
    assert_eq!(created["title"], "Draft contract");
    assert_eq!(created["metadata"]["tenant_id"], "acme");

    let appended = run_json(&readme_block(&readme, "append"), &workdir);
    assert_eq!(appended["seq"], 1);
    assert_eq!(appended["deduped"], false);

    let tail = Command::new("bash")
        .args(["-c", &readme_block(&readme, "tail")])
        .current_dir(&workdir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the tail block");
    let mut tail = Guard(tail);
    let (lines, received) = mpsc::channel();
    let stdout = tail.0.stdout.take().expect("tail stdout is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let first: Value = serde_json::from_str(
        &received
            .recv_timeout(Duration::from_secs(10))
            .expect("tail printed event 1"),
    )
    .expect("tail line is JSON");
    assert_eq!(first["seq"], 1);
    assert_eq!(first["payload"]["text"], "Working...");
    assert_eq!(first["actor"], "agent:planner");

    // The README says a second append arrives on the open tail.
    let again = run_json(&readme_block(&readme, "append"), &workdir);
    assert_eq!(again["seq"], 2);
    let second: Value = serde_json::from_str(
        &received
            .recv_timeout(Duration::from_secs(10))
            .expect("tail printed event 2"),
    )
    .expect("tail line is JSON");
    assert_eq!(second["seq"], 2);

    // bash runs the tail client as its child; end both.
    let _ = Command::new("pkill")
        .args(["-P", &tail.0.id().to_string()])
        .status();
    let _ = tail.0.kill();
}

//! Black-box harness for the `starcite` binary.
//!
//! Every test starts its own server process on `PORT=0` with its own data
//! directory, so test files and tests inside them can run in parallel. The
//! helpers talk to the server only through its public HTTP and WebSocket
//! interface.

#![allow(dead_code)]

pub mod cluster;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for the server to print its `listening` line and then report
/// ready, and for it to exit after SIGTERM.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Time between two `GET /health/ready` probes while waiting for readiness.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A WebSocket tail opened with the default client configuration.
pub type Tail = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A running `starcite` process with its data directory and captured output.
pub struct Server {
    pub addr: std::net::SocketAddr,
    child: Option<Child>,
    data_dir: PathBuf,
    env: Vec<(String, String)>,
    log: Arc<Mutex<String>>,
    client: reqwest::Client,
    // Kept last so the directory is removed after the child is gone.
    _temp_dir: Option<TempDir>,
}

/// A server process that never became ready.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status if the process exited, `None` if it hung and was killed.
    pub status: Option<ExitStatus>,
    /// Everything the process printed on stdout and stderr.
    pub logs: String,
}

impl Server {
    /// Starts a server on a fresh temporary data directory.
    pub fn start() -> Server {
        let temp_dir = tempfile::Builder::new()
            .prefix("starcite-test-")
            .tempdir()
            .expect("failed to create a temporary data directory");
        let data_dir = temp_dir.path().to_path_buf();

        let mut server = Self::start_with(&data_dir, &[]);
        server._temp_dir = Some(temp_dir);
        server
    }

    /// Starts a server on a data directory that the caller owns and removes.
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        match Self::try_start_with(data_dir, env) {
            Ok(server) => server,
            Err(failure) => panic!(
                "server on {} did not become ready (exit status {:?}); output:\n{}",
                data_dir.display(),
                failure.status,
                failure.logs
            ),
        }
    }

    /// Starts a server and returns its exit status and output if it does not
    /// become ready, for tests where a refusal to start is a valid outcome.
    pub fn try_start_with(data_dir: &Path, env: &[(&str, &str)]) -> Result<Server, StartFailure> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let log = Arc::new(Mutex::new(String::new()));

        let (child, addr) = spawn_ready(data_dir, &env, &log)?;

        Ok(Server {
            addr,
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            env,
            log,
            client: reqwest::Client::new(),
            _temp_dir: None,
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// Returns `http://127.0.0.1:PORT{path}`.
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Returns `ws://127.0.0.1:PORT{path}`.
    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Returns the keep-alive HTTP client that the helpers use for this server.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Returns whether the process is running (not killed or stopped by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Process id of the running child.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is not running").id()
    }

    /// Resident set size of the server process in KiB, from `/proc`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("failed to read /proc/PID/status of the server");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .expect("no VmRSS line in /proc/PID/status")
    }

    /// Sends SIGKILL and waits for the process to exit.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(&child, libc::SIGKILL);
        child.wait().expect("failed to wait for the killed server");
    }

    /// Sends SIGTERM and waits up to 30 s for a clean exit.
    ///
    /// Panics (after SIGKILL) if the process is still running then, because
    /// a server that ignores SIGTERM breaks every orderly shutdown.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is not running");
        send_signal(&child, libc::SIGTERM);

        let deadline = Instant::now() + PROCESS_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("failed to poll the server") {
                return status;
            }
            if Instant::now() >= deadline {
                send_signal(&child, libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "server did not exit within {PROCESS_TIMEOUT:?} after SIGTERM; output:\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same data directory and settings.
    ///
    /// The new process gets a new port, so `addr` changes.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart needs a stopped server: call kill9 or sigterm first"
        );
        append_log(&self.log, "---- harness: restarting server ----\n");

        match spawn_ready(&self.data_dir, &self.env, &self.log) {
            Ok((child, addr)) => {
                self.child = Some(child);
                self.addr = addr;
            }
            Err(failure) => panic!(
                "restarted server did not become ready (exit status {:?}); output:\n{}",
                failure.status, failure.logs
            ),
        }
    }

    /// Everything the process (and earlier processes on this `Server`)
    /// printed so far.
    pub fn logs(&self) -> String {
        self.log.lock().expect("log mutex poisoned").clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

fn send_signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid out of range");
    // SAFETY: kill(2) with a PID of a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

fn append_log(log: &Mutex<String>, text: &str) {
    log.lock().expect("log mutex poisoned").push_str(text);
}

/// Spawns the binary, waits for its `listening` line and then for
/// `GET /health/ready` to return 200.
fn spawn_ready(
    data_dir: &Path,
    env: &[(String, String)],
    log: &Arc<Mutex<String>>,
) -> Result<(Child, SocketAddr), StartFailure> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_starcite"));
    command
        .env("PORT", "0")
        .env("STARCITE_HOST", "127.0.0.1")
        .env("STARCITE_RAFT_DATA_DIR", data_dir)
        .envs(
            env.iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .expect("failed to spawn the starcite binary");

    let (addr_sender, addr_receiver) = mpsc::channel();
    capture_output(
        child.stdout.take().expect("stdout is piped"),
        log,
        Some(addr_sender),
    );
    capture_output(child.stderr.take().expect("stderr is piped"), log, None);

    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let addr = match wait_for_addr(&mut child, &addr_receiver, deadline) {
        Ok(addr) => addr,
        Err(status) => return Err(fail_start(child, status, log)),
    };

    match wait_until_ready(&mut child, addr, deadline) {
        Ok(()) => Ok((child, addr)),
        Err(status) => Err(fail_start(child, status, log)),
    }
}

/// Kills a child that did not become ready and collects its output.
fn fail_start(mut child: Child, status: Option<ExitStatus>, log: &Mutex<String>) -> StartFailure {
    let status = match status {
        Some(status) => Some(status),
        None => {
            send_signal(&child, libc::SIGKILL);
            let _ = child.wait();
            None
        }
    };

    // The output threads may still be copying the last lines out of the pipes.
    thread::sleep(Duration::from_millis(200));

    StartFailure {
        status,
        logs: log.lock().expect("log mutex poisoned").clone(),
    }
}

/// Copies a child pipe into the shared log line by line, and sends the
/// address of the first line containing `listening` and `addr=`.
fn capture_output(
    pipe: impl Read + Send + 'static,
    log: &Arc<Mutex<String>>,
    addr_sender: Option<mpsc::Sender<SocketAddr>>,
) {
    let log = Arc::clone(log);
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        let mut addr_sender = addr_sender;
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            append_log(&log, &text);

            if let Some(addr) = parse_listening_addr(&text) {
                if let Some(sender) = addr_sender.take() {
                    let _ = sender.send(addr);
                }
            }
        }
    });
}

/// Extracts `127.0.0.1:PORT` from a log line such as
/// `INFO starcite: listening addr=127.0.0.1:41234`.
pub fn parse_listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    let start = line.find("addr=")? + "addr=".len();
    let value: String = line[start..]
        .trim_start_matches(['"', '\''])
        .chars()
        .take_while(|c| !c.is_whitespace() && !matches!(c, '"' | '\'' | ',' | '}'))
        .collect();
    value.parse().ok()
}

fn wait_for_addr(
    child: &mut Child,
    addr_receiver: &mpsc::Receiver<SocketAddr>,
    deadline: Instant,
) -> Result<SocketAddr, Option<ExitStatus>> {
    loop {
        if let Ok(addr) = addr_receiver.recv_timeout(Duration::from_millis(50)) {
            return Ok(addr);
        }
        if let Some(status) = child.try_wait().expect("failed to poll the server") {
            return Err(Some(status));
        }
        if Instant::now() >= deadline {
            return Err(None);
        }
    }
}

fn wait_until_ready(
    child: &mut Child,
    addr: SocketAddr,
    deadline: Instant,
) -> Result<(), Option<ExitStatus>> {
    loop {
        if blocking_get_status(addr, "/health/ready") == Some(200) {
            return Ok(());
        }
        if let Some(status) = child.try_wait().expect("failed to poll the server") {
            return Err(Some(status));
        }
        if Instant::now() >= deadline {
            return Err(None);
        }
        thread::sleep(READY_POLL_INTERVAL);
    }
}

/// Sends one `GET` over a plain socket and returns the status code.
///
/// The harness uses blocking I/O here because `Server::start` is called
/// both inside and outside async runtimes.
fn blocking_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let timeout = Duration::from_secs(1);
    let mut stream = StdTcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;

    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;

    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    parse_status_line(&response)
}

fn parse_status_line(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response.get(..response.len().min(64))?).ok()?;
    let mut parts = text.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// Ids, events and small checks
// ---------------------------------------------------------------------------

/// Percent-encodes a session id for use as one URL path segment.
///
/// Everything outside the RFC 3986 unreserved set is encoded, so slashes,
/// spaces, `%` and non-ASCII bytes reach the server as part of the id.
pub fn encode_id(id: &str) -> String {
    let mut encoded = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Path of a session resource, with the id percent-encoded.
pub fn session_path(id: &str) -> String {
    format!("/v1/sessions/{}", encode_id(id))
}

/// A small valid event whose payload is `{"n": n}`.
pub fn tick(n: u64) -> Value {
    json!({"type": "tick", "payload": {"n": n}, "actor": "agent:a"})
}

/// Checks the RFC 3339 UTC form `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
pub fn is_rfc3339_utc(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || *bytes.last().unwrap() != b'Z' {
        return false;
    }
    let digits_at = |positions: &[usize]| positions.iter().all(|&i| bytes[i].is_ascii_digit());
    let fixed_ok = digits_at(&[0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
        && bytes[16] == b':';
    let fraction = &bytes[19..bytes.len() - 1];
    let fraction_ok = fraction.is_empty()
        || (fraction[0] == b'.'
            && fraction.len() > 1
            && fraction[1..].iter().all(u8::is_ascii_digit));
    fixed_ok && fraction_ok
}

/// Asserts the error contract: the expected status, and a body that is
/// exactly `{"error": code, "message": non-empty string}`.
#[track_caller]
pub fn assert_error(
    status: u16,
    body: &Value,
    expected_status: u16,
    expected_code: &str,
    context: &str,
) {
    assert_eq!(
        status, expected_status,
        "{context}: expected HTTP {expected_status}, got {status} with body {body}"
    );
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("{context}: error body is not a JSON object: {body}"));
    assert_eq!(
        object.get("error").and_then(Value::as_str),
        Some(expected_code),
        "{context}: expected error code {expected_code:?}, got body {body}"
    );
    let message = object.get("message").and_then(Value::as_str);
    assert!(
        message.is_some_and(|m| !m.trim().is_empty()),
        "{context}: error body needs a non-empty string message, got {body}"
    );
    assert_eq!(
        object.len(),
        2,
        "{context}: error body must contain only error and message, got {body}"
    );
}

/// Returns the `message` string of an error body, or "".
pub fn error_message(body: &Value) -> &str {
    body.get("message").and_then(Value::as_str).unwrap_or("")
}

/// Returns true if `text` contains `number` as a whole decimal token.
pub fn mentions_number(text: &str, number: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|token| token == number.to_string())
}

/// Tiny xorshift generator for random delays and cut points; prints its
/// seed so a failing run can be reasoned about.
pub struct Rng(u64);

impl Rng {
    pub fn from_time(label: &str) -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock before 1970")
            .as_nanos() as u64;
        let seed = nanos | 1;
        eprintln!("{label}: random seed {seed}");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish value in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }
}

// ---------------------------------------------------------------------------
// REST helpers
// ---------------------------------------------------------------------------

/// Reads a response as (status, JSON body); a non-JSON body becomes a JSON
/// string so that assertions can print it.
pub async fn read_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let bytes = response
        .bytes()
        .await
        .expect("failed to read the response body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

/// `POST /v1/sessions` with a JSON body.
pub async fn create_session(server: &Server, body: Value) -> (u16, Value) {
    let response = server
        .client()
        .post(server.http("/v1/sessions"))
        .json(&body)
        .send()
        .await
        .expect("create session request failed");
    read_json(response).await
}

/// Creates a session with the given id and asserts 201.
pub async fn create_ok(server: &Server, id: &str) -> Value {
    let (status, body) = create_session(server, json!({"id": id})).await;
    assert_eq!(status, 201, "creating session {id:?} failed: {body}");
    body
}

/// `GET /v1/sessions/:id`.
pub async fn get_session(server: &Server, id: &str) -> (u16, Value) {
    let response = server
        .client()
        .get(server.http(&session_path(id)))
        .send()
        .await
        .expect("get session request failed");
    read_json(response).await
}

/// `last_seq` of an existing session.
pub async fn last_seq(server: &Server, id: &str) -> u64 {
    let (status, body) = get_session(server, id).await;
    assert_eq!(status, 200, "GET session {id:?} failed: {body}");
    body["last_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("session header has no integer last_seq: {body}"))
}

/// `POST /v1/sessions/:id/append` with a JSON body.
pub async fn append(server: &Server, id: &str, event: Value) -> (u16, Value) {
    append_with(server.client(), server, id, &event).await
}

/// Appends through a given client (for tests that need separate connections).
pub async fn append_with(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
    event: &Value,
) -> (u16, Value) {
    let response = client
        .post(server.http(&format!("{}/append", session_path(id))))
        .json(event)
        .send()
        .await
        .expect("append request failed");
    read_json(response).await
}

/// Appends and asserts 201, returning the assigned seq.
pub async fn append_ok(server: &Server, id: &str, event: Value) -> u64 {
    let (status, body) = append(server, id, event.clone()).await;
    assert_eq!(status, 201, "append {event} to {id:?} failed: {body}");
    body["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("append response has no integer seq: {body}"))
}

/// An acknowledged append: the seq the server returned and the event sent.
#[derive(Clone, Debug)]
pub struct Ack {
    pub seq: u64,
    pub event: Value,
}

/// Appends every event with up to `concurrency` requests in flight and
/// asserts each gets 201. Returns the acks sorted by seq.
pub async fn append_all(
    server: &Server,
    id: &str,
    events: Vec<Value>,
    concurrency: usize,
) -> Vec<Ack> {
    let client = server.client().clone();
    let url = server.http(&format!("{}/append", session_path(id)));

    let mut acks: Vec<Ack> = futures_util::stream::iter(events)
        .map(|event| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let response = client
                    .post(&url)
                    .json(&event)
                    .send()
                    .await
                    .expect("append request failed");
                let (status, body) = read_json(response).await;
                assert_eq!(status, 201, "append {event} failed: {body}");
                let seq = body["seq"].as_u64().expect("append response has no seq");
                Ack { seq, event }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;

    acks.sort_by_key(|ack| ack.seq);
    acks
}

/// Appends `count` tick events numbered `first..first+count`.
pub async fn append_ticks(
    server: &Server,
    id: &str,
    first: u64,
    count: u64,
    concurrency: usize,
) -> Vec<Ack> {
    let events = (first..first + count).map(tick).collect();
    append_all(server, id, events, concurrency).await
}

/// `GET path` returning (status, JSON body).
pub async fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let response = server
        .client()
        .get(server.http(path))
        .send()
        .await
        .expect("GET request failed");
    read_json(response).await
}

/// Sends a request with a raw body and optional content type.
pub async fn send_raw(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut request = server
        .client()
        .request(method, server.http(path))
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header(reqwest::header::CONTENT_TYPE, content_type);
    }
    let response = request.send().await.expect("raw request failed");
    read_json(response).await
}

/// Sends a request whose body is `body_len` bytes of a JSON-looking filler,
/// over a plain socket, and returns the status and body of the response.
///
/// The body is written concurrently with reading the response, so a server
/// that answers 413 before consuming the body is observed correctly. With
/// `chunked`, the body uses chunked transfer encoding and no
/// `Content-Length`. The writer stops at the first write error (the server
/// closed the connection) or after `body_len` bytes.
pub async fn send_large_body(
    server: &Server,
    path: &str,
    body_len: usize,
    chunked: bool,
) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("failed to connect to the server");
    let (mut reader, mut writer) = stream.into_split();

    let length_header = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {body_len}")
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{length_header}\r\nConnection: close\r\n\r\n",
        server.addr
    );

    let write_task = tokio::spawn(async move {
        if writer.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        while sent < body_len {
            let size = chunk.len().min(body_len - sent);
            let result = if chunked {
                let mut framed = format!("{size:X}\r\n").into_bytes();
                framed.extend_from_slice(&chunk[..size]);
                framed.extend_from_slice(b"\r\n");
                writer.write_all(&framed).await
            } else {
                writer.write_all(&chunk[..size]).await
            };
            if result.is_err() {
                return;
            }
            sent += size;
        }
        if chunked {
            let _ = writer.write_all(b"0\r\n\r\n").await;
        }
    });

    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buffer = [0u8; 8192];
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buffer[..n]),
            }
            if response_complete(&response) {
                break;
            }
        }
    })
    .await;
    write_task.abort();
    assert!(
        read.is_ok(),
        "no response to a {body_len}-byte body within 60 s"
    );

    let status = parse_status_line(&response).unwrap_or_else(|| {
        panic!(
            "no HTTP status line in response: {:?}\nserver log:\n{}",
            String::from_utf8_lossy(&response),
            server.logs()
        )
    });
    let text = String::from_utf8_lossy(&response).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// True once the buffered bytes hold the headers and a `Content-Length`
/// body in full.
fn response_complete(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    length.is_some_and(|length| body.len() >= length)
}

/// Reads `GET /metrics`.
pub async fn metrics_text(server: &Server) -> String {
    let response = server
        .client()
        .get(server.http("/metrics"))
        .send()
        .await
        .expect("GET /metrics failed");
    assert_eq!(response.status().as_u16(), 200, "GET /metrics status");
    response.text().await.expect("failed to read /metrics")
}

/// Sums every sample of a metric family (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            found = true;
            sum += value;
        }
    }
    found.then_some(sum)
}

// ---------------------------------------------------------------------------
// Tail helpers
// ---------------------------------------------------------------------------

/// Path and query of a tail request.
pub fn tail_path(id: &str, query: &str) -> String {
    if query.is_empty() {
        format!("{}/tail", session_path(id))
    } else {
        format!("{}/tail?{query}", session_path(id))
    }
}

/// Opens a tail WebSocket at `cursor` and panics if the upgrade fails.
pub async fn tail_open(server: &Server, id: &str, cursor: u64) -> Tail {
    tail_open_query(server, id, &format!("cursor={cursor}")).await
}

/// Opens a tail WebSocket with a raw query string (may be empty).
pub async fn tail_open_query(server: &Server, id: &str, query: &str) -> Tail {
    let url = server.ws(&tail_path(id, query));
    let config = WebSocketConfig::default();
    match tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true).await {
        Ok((tail, _response)) => tail,
        Err(error) => panic!(
            "tail upgrade at {url} failed: {}",
            describe_ws_error(&error)
        ),
    }
}

/// Opens a tail with a given maximum message size (for large events).
pub async fn tail_open_with_max_message(
    server: &Server,
    id: &str,
    cursor: u64,
    max_message: usize,
) -> Tail {
    let url = server.ws(&tail_path(id, &format!("cursor={cursor}")));
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    match tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true).await {
        Ok((tail, _response)) => tail,
        Err(error) => panic!(
            "tail upgrade at {url} failed: {}",
            describe_ws_error(&error)
        ),
    }
}

/// Opens a tail over a socket whose kernel receive buffer is `recv_buffer`
/// bytes, so a client that stops reading stalls the server quickly.
pub async fn tail_open_small_buffer(
    server: &Server,
    id: &str,
    cursor: u64,
    recv_buffer: u32,
) -> WebSocketStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("failed to create a socket");
    socket
        .set_recv_buffer_size(recv_buffer)
        .expect("failed to set SO_RCVBUF");
    let stream = socket
        .connect(server.addr)
        .await
        .expect("failed to connect to the server");

    let url = server.ws(&tail_path(id, &format!("cursor={cursor}")));
    match tokio_tungstenite::client_async_with_config(url.as_str(), stream, None).await {
        Ok((tail, _response)) => tail,
        Err(error) => panic!(
            "tail upgrade at {url} failed: {}",
            describe_ws_error(&error)
        ),
    }
}

fn describe_ws_error(error: &WsError) -> String {
    match error {
        WsError::Http(response) => {
            let body = response
                .body()
                .as_ref()
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
                .unwrap_or_default();
            format!("HTTP {} {body}", response.status())
        }
        other => other.to_string(),
    }
}

/// Sends a WebSocket upgrade request that the test expects to be rejected,
/// and returns the HTTP status and JSON body. Status 101 means the server
/// accepted the upgrade.
pub async fn tail_reject(server: &Server, path_and_query: &str) -> (u16, Value) {
    let response = server
        .client()
        .get(server.http(path_and_query))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("tail upgrade request failed");
    if response.status().as_u16() == 101 {
        return (101, Value::Null);
    }
    read_json(response).await
}

/// One item read from a tail.
#[derive(Debug)]
pub enum TailItem {
    Event(Value),
    Closed { code: Option<u16>, reason: String },
    Timeout,
}

/// Reads the next event frame, skipping control frames.
///
/// Panics on a binary frame or a text frame that is not JSON, because the
/// tail sends one JSON event per text frame.
pub async fn next_item<S>(tail: &mut S, timeout: Duration) -> TailItem
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = match tokio::time::timeout_at(deadline, tail.next()).await {
            Err(_) => return TailItem::Timeout,
            Ok(next) => next,
        };
        match next {
            None => {
                return TailItem::Closed {
                    code: None,
                    reason: "stream ended".into(),
                }
            }
            Some(Err(error)) => {
                return TailItem::Closed {
                    code: None,
                    reason: format!("error: {error}"),
                }
            }
            Some(Ok(Message::Text(text))) => {
                let value = serde_json::from_str(text.as_str())
                    .unwrap_or_else(|e| panic!("tail frame is not JSON ({e}): {text}"));
                return TailItem::Event(value);
            }
            Some(Ok(Message::Binary(bytes))) => {
                panic!(
                    "tail sent a binary frame of {} bytes; expected text",
                    bytes.len()
                )
            }
            Some(Ok(Message::Close(frame))) => {
                return TailItem::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                }
            }
            Some(Ok(_control)) => continue,
        }
    }
}

/// Seq of an event frame.
#[track_caller]
pub fn frame_seq(frame: &Value) -> u64 {
    frame["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("tail frame has no integer seq: {frame}"))
}

/// Reads events until one with `seq == until_seq` arrives. Panics on close,
/// error or timeout, naming the last seq seen.
pub async fn read_until<S>(tail: &mut S, until_seq: u64, timeout: Duration) -> Vec<Value>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut frames = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = frames.last().map(frame_seq);
        match next_item(tail, remaining).await {
            TailItem::Event(frame) => {
                let seq = frame_seq(&frame);
                frames.push(frame);
                if seq == until_seq {
                    return frames;
                }
            }
            TailItem::Closed { code, reason } => panic!(
                "tail closed (code {code:?}, {reason}) after {} frames, last seq {last:?}, waiting for seq {until_seq}",
                frames.len()
            ),
            TailItem::Timeout => panic!(
                "tail timed out after {timeout:?} with {} frames, last seq {last:?}, waiting for seq {until_seq}",
                frames.len()
            ),
        }
    }
}

/// Reads whatever events arrive within `duration`; panics if the tail closes.
pub async fn read_for<S>(tail: &mut S, duration: Duration) -> Vec<Value>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + duration;
    let mut frames = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_item(tail, remaining).await {
            TailItem::Event(frame) => frames.push(frame),
            TailItem::Timeout => return frames,
            TailItem::Closed { code, reason } => {
                panic!(
                    "tail closed unexpectedly (code {code:?}, {reason}) after {} frames",
                    frames.len()
                )
            }
        }
    }
}

/// Opens a tail at `cursor` and reads until `until_seq` arrives.
pub async fn tail_collect(
    server: &Server,
    id: &str,
    cursor: u64,
    until_seq: u64,
    timeout: Duration,
) -> Vec<Value> {
    if until_seq <= cursor {
        return Vec::new();
    }
    let mut tail = tail_open(server, id, cursor).await;
    let frames = read_until(&mut tail, until_seq, timeout).await;
    let _ = tail.close(None).await;
    frames
}

/// Asserts that frames carry exactly seqs `first..=last`, in order.
#[track_caller]
pub fn assert_gapless(frames: &[Value], first: u64, last: u64, context: &str) {
    let seqs: Vec<u64> = frames.iter().map(frame_seq).collect();
    for (index, seq) in seqs.iter().enumerate() {
        let expected = first + index as u64;
        assert_eq!(
            *seq, expected,
            "{context}: frame {index} has seq {seq}, expected {expected} (seqs must run {first}..={last} without gap or repeat)"
        );
    }
    let expected_len = (last + 1).saturating_sub(first) as usize;
    assert_eq!(
        seqs.len(),
        expected_len,
        "{context}: expected seqs {first}..={last}, got {} frames",
        seqs.len()
    );
}

/// Asserts each acked event is the frame at its seq, comparing type, actor
/// and payload as JSON values.
#[track_caller]
pub fn assert_frames_match_acks(frames: &[Value], acks: &[Ack], context: &str) {
    for ack in acks {
        let frame = frames
            .iter()
            .find(|frame| frame_seq(frame) == ack.seq)
            .unwrap_or_else(|| panic!("{context}: acked seq {} missing from the tail", ack.seq));
        for field in ["type", "actor", "payload"] {
            assert_eq!(
                frame[field], ack.event[field],
                "{context}: seq {} field {field} differs from the acked event",
                ack.seq
            );
        }
    }
}

/// Sends a text frame on a tail (the server must ignore it).
pub async fn send_text<S>(tail: &mut S, text: &str)
where
    S: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    tail.send(Message::text(text))
        .await
        .expect("failed to send a text frame on the tail");
}

// ---------------------------------------------------------------------------
// Background writers for crash and shutdown tests
// ---------------------------------------------------------------------------

/// What a background writer sent and what the server acknowledged.
#[derive(Debug, Default)]
pub struct WriterLog {
    pub session: String,
    pub writer: u64,
    /// Every event sent, indexed by its `payload.i`, acked or not.
    pub sent: Vec<Value>,
    pub acks: Vec<Ack>,
    /// The response that stopped the writer: a non-201 status and body, or
    /// `None` when a transport error (connection refused or reset) did.
    pub stopped_by: Option<(u16, String)>,
}

/// Event number `i` of background writer `writer`, with padding so that a
/// crash is likely to tear a record.
pub fn writer_event(writer: u64, i: u64) -> Value {
    json!({
        "type": "x",
        "payload": {"writer": writer, "i": i, "pad": "p".repeat(100)},
        "actor": format!("agent:w{writer}")
    })
}

/// Spawns a writer that appends `writer_event(writer, 0..)` to `session`
/// one at a time until a request fails, `max_events` were sent, or `stop`
/// is set. Every 201 increments `acked`.
pub fn spawn_writer(
    server: &Server,
    session: &str,
    writer: u64,
    max_events: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<WriterLog> {
    use std::sync::atomic::Ordering;

    let client = reqwest::Client::new();
    let url = server.http(&format!("{}/append", session_path(session)));
    let mut log = WriterLog {
        session: session.to_string(),
        writer,
        ..WriterLog::default()
    };

    tokio::spawn(async move {
        for i in 0..max_events {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let event = writer_event(writer, i);
            log.sent.push(event.clone());

            let response = match client.post(&url).json(&event).send().await {
                Ok(response) => response,
                Err(_) => break,
            };
            let status = response.status().as_u16();
            let Ok(body) = response.text().await else {
                break;
            };
            if status != 201 {
                log.stopped_by = Some((status, body));
                break;
            }
            let parsed: Value = serde_json::from_str(&body).expect("201 body is JSON");
            let seq = parsed["seq"].as_u64().expect("201 body has a seq");
            log.acks.push(Ack { seq, event });
            acked.fetch_add(1, Ordering::Relaxed);
        }
        log
    })
}

/// Waits until `acked` reaches `target` or `limit` passes.
pub async fn wait_for_acks(
    acked: &std::sync::atomic::AtomicU64,
    target: u64,
    limit: Duration,
) -> u64 {
    use std::sync::atomic::Ordering;

    let deadline = tokio::time::Instant::now() + limit;
    while acked.load(Ordering::Relaxed) < target && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acked.load(Ordering::Relaxed)
}

/// Checks a session after a crash or shutdown against its writers' logs:
/// seqs run 1..=last_seq without gap, every acked event sits at its seq
/// unchanged, every stored event is one that a writer sent (complete) and
/// none is stored twice, and the next append gets last_seq + 1.
pub async fn verify_recovered_session(server: &Server, session: &str, logs: &[&WriterLog]) {
    let last = last_seq(server, session).await;
    let highest_ack = logs
        .iter()
        .flat_map(|log| log.acks.iter().map(|ack| ack.seq))
        .max()
        .unwrap_or(0);
    assert!(
        last >= highest_ack,
        "{session}: last_seq {last} is below the highest acked seq {highest_ack}"
    );

    let frames = tail_collect(server, session, 0, last, Duration::from_secs(60)).await;
    assert_gapless(&frames, 1, last, &format!("{session} after restart"));

    for log in logs {
        for ack in &log.acks {
            let frame = &frames[(ack.seq - 1) as usize];
            for field in ["type", "actor", "payload"] {
                assert_eq!(
                    frame[field], ack.event[field],
                    "{session}: acked seq {} changed its {field} after restart",
                    ack.seq
                );
            }
        }
    }

    let mut seen = std::collections::HashSet::new();
    for frame in &frames {
        let writer = frame["payload"]["writer"].as_u64();
        let index = frame["payload"]["i"].as_u64();
        let (Some(writer), Some(index)) = (writer, index) else {
            panic!("{session}: stored event was not sent by any writer: {frame}");
        };
        let log = logs
            .iter()
            .find(|log| log.writer == writer)
            .unwrap_or_else(|| panic!("{session}: event from unknown writer {writer}: {frame}"));
        let sent = log
            .sent
            .get(index as usize)
            .unwrap_or_else(|| panic!("{session}: writer {writer} never sent i={index}: {frame}"));
        assert_eq!(
            frame["payload"], sent["payload"],
            "{session}: stored event is incomplete or altered"
        );
        assert_eq!(
            frame["actor"], sent["actor"],
            "{session}: stored actor differs from the sent one"
        );
        assert!(
            seen.insert((writer, index)),
            "{session}: writer {writer} event {index} stored twice"
        );
    }

    let next = append_ok(server, session, tick(0)).await;
    assert_eq!(next, last + 1, "{session}: next append after restart");
}

/// How a tail followed by [`follow_gapless`] ended before the target seq.
#[derive(Debug)]
pub struct TailStopped {
    /// Last seq received before the stop.
    pub last_seq: u64,
    pub item: TailItem,
}

/// Reads events after `after` until seq `until` arrives, asserting that
/// each frame carries exactly the next seq. Frames are not kept, so many
/// readers can follow long logs. Returns the stop reason if the tail
/// closes or times out first.
pub async fn follow_gapless<S>(
    tail: &mut S,
    after: u64,
    until: u64,
    timeout: Duration,
    context: &str,
) -> Result<(), TailStopped>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = after;
    while last < until {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_item(tail, remaining).await {
            TailItem::Event(frame) => {
                let seq = frame_seq(&frame);
                assert_eq!(
                    seq,
                    last + 1,
                    "{context}: seq {seq} arrived after seq {last}"
                );
                last = seq;
            }
            item => {
                return Err(TailStopped {
                    last_seq: last,
                    item,
                })
            }
        }
    }
    Ok(())
}

/// An event with about `pad` bytes of padding in its payload.
pub fn padded_tick(n: u64, pad: usize) -> Value {
    json!({"type": "tick", "payload": {"n": n, "pad": "p".repeat(pad)}, "actor": "agent:a"})
}

/// Sends a complete JSON `POST` over a plain socket and closes the socket
/// without reading the response, like a client or proxy that gives up
/// right after sending. Whether the server stored the request is unknown
/// to the caller.
pub async fn send_and_hang_up(server: &Server, path: &str, body: &Value) {
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        server.addr,
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("failed to connect to the server");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("failed to send the request");
    drop(stream);
}

//! `starcite-bench`: a load generator that drives a running Starcite server
//! over HTTP and WebSocket and reports throughput and latency.
//!
//! It is a black-box client. It uses only the public API (create session,
//! read session, append, tail), so it builds and runs against any server that
//! speaks that API, and it never links the server's library code.
//!
//! Latencies are collected as raw microsecond samples and sorted at the end,
//! which costs 8 bytes per sample and is fine up to tens of millions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

#[derive(Parser, Debug)]
#[command(
    name = "starcite-bench",
    about = "Load generator for a running Starcite server (HTTP appends, WebSocket tails)"
)]
struct Cli {
    /// Base URL of the server under test (plain http only). For a cluster,
    /// a comma-separated list: writer `i` appends through URL `i % n`, and
    /// everything else uses the first.
    #[arg(
        long,
        env = "STARCITE_BENCH_URL",
        default_value = "http://127.0.0.1:4000",
        global = true
    )]
    url: String,

    /// Worker threads of the load generator's tokio runtime.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256), global = true)]
    threads: u16,

    /// Print the results as JSON on stdout, and the human-readable report on stderr.
    #[arg(long, global = true)]
    json: bool,

    /// Timeout of each HTTP request, in seconds.
    #[arg(long, default_value_t = 30.0, value_parser = parse_positive, global = true)]
    request_timeout_secs: f64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure append throughput and latency.
    Append(AppendArgs),
    /// Measure append-to-delivery latency over many tail sockets and check delivery order.
    Tail(TailArgs),
    /// Measure how fast one tail socket receives a long session from cursor 0.
    Replay(ReplayArgs),
    /// Run the standard suite and print a markdown table.
    All(AllArgs),
}

#[derive(Args, Debug, Clone)]
struct AppendArgs {
    /// Concurrent writers, each with its own keep-alive connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    writers: u32,

    /// How long to send appends, in seconds.
    #[arg(long, default_value_t = 10.0, value_parser = parse_positive)]
    duration_secs: f64,

    /// Put every writer on one shared session instead of one session per writer.
    #[arg(long)]
    same_session: bool,

    /// Total target rate in appends per second, spread evenly over the writers
    /// (open loop, latency measured from each intended send time). Without it
    /// each writer sends its next append as soon as the previous one is
    /// acknowledged (closed loop).
    #[arg(long, value_parser = parse_positive)]
    rate: Option<f64>,

    /// Length of the filler string in each event payload, in bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
}

#[derive(Args, Debug, Clone)]
struct TailArgs {
    /// Tail WebSocket connections, all on one session from cursor 0.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    sockets: u32,

    /// Events to append while the sockets listen.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    events: u64,

    /// Append rate, in events per second.
    #[arg(long, default_value_t = 2_000.0, value_parser = parse_positive)]
    rate: f64,

    /// Concurrent append connections that share the rate.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    writers: u32,

    /// Length of the filler string in each event payload, in bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,

    /// How long to wait after the last append for every socket to receive
    /// every event, in seconds.
    #[arg(long, default_value_t = 30.0, value_parser = parse_positive)]
    drain_timeout_secs: f64,
}

#[derive(Args, Debug, Clone)]
struct ReplayArgs {
    /// Events the session must contain before the replay. Missing ones are appended first.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    events: u64,

    /// Replay this existing session instead of creating one. Events are
    /// appended only to bring it up to --events, so repeated runs skip the setup.
    #[arg(long)]
    session: Option<String>,

    /// Concurrent connections that append the setup events.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    setup_connections: u32,

    /// Length of the filler string in each setup event payload, in bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,

    /// Max time to receive the whole replay, in seconds.
    #[arg(long, default_value_t = 300.0, value_parser = parse_positive)]
    timeout_secs: f64,
}

#[derive(Args, Debug, Clone)]
struct AllArgs {
    /// Duration of each append scenario, in seconds.
    #[arg(long, default_value_t = 10.0, value_parser = parse_positive)]
    duration_secs: f64,

    /// Length of the filler string in each event payload, in bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,

    /// Events appended in the tail scenario (100 sockets, 2,000 events/s).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    tail_events: u64,

    /// Events in the replay scenario.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    replay_events: u64,

    /// Existing session for the replay scenario (see `replay --session`).
    #[arg(long)]
    replay_session: Option<String>,
}

/// Parses a finite number greater than zero (a rate or a number of seconds).
fn parse_positive(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("`{text}` must be a number greater than 0"));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------
// Entry point and output
// ---------------------------------------------------------------------------

/// Exit status when a run finished but found ordering or delivery violations.
const EXIT_VIOLATIONS: u8 = 1;

/// Exit status when a run could not be carried out (server down, setup failed).
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(cli.threads))
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the tokio runtime: {error}");
            return ExitCode::from(EXIT_ERROR);
        }
    };

    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_VIOLATIONS),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Runs the chosen subcommand and prints its report. Returns whether every
/// correctness check passed.
async fn run(cli: Cli) -> Result<bool> {
    let api = Api::new(&cli.url, Duration::from_secs_f64(cli.request_timeout_secs))?;
    let output = Output { json: cli.json };
    let started_at_unix_secs = unix_secs();

    let reports = match &cli.command {
        Command::Append(args) => vec![Report::Append(run_append(&api, args).await?)],
        Command::Tail(args) => vec![Report::Tail(run_tail(&api, args).await?)],
        Command::Replay(args) => vec![Report::Replay(run_replay(&api, args).await?)],
        Command::All(args) => run_all(&api, args, &output).await?,
    };

    if let Command::All(_) = cli.command {
        output.human(&markdown_table(&reports));
    } else {
        for report in &reports {
            output.human(&report.to_text());
        }
    }

    let passed = reports.iter().all(Report::passed);
    if !passed {
        eprintln!("FAILED: tail delivery violations found, listed in the report above");
    }

    if output.json {
        let document = JsonDocument {
            url: &cli.url,
            threads: cli.threads,
            started_at_unix_secs,
            passed,
            results: &reports,
        };
        println!("{}", serde_json::to_string_pretty(&document)?);
    }
    Ok(passed)
}

/// Destination of the human-readable report: stdout, or stderr when stdout
/// carries JSON.
struct Output {
    json: bool,
}

impl Output {
    fn human(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

/// The JSON printed with `--json`.
#[derive(Serialize)]
struct JsonDocument<'a> {
    url: &'a str,
    threads: u16,
    started_at_unix_secs: u64,
    passed: bool,
    results: &'a [Report],
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// HTTP API client
// ---------------------------------------------------------------------------

/// Control-plane access to the server: session setup and lookups, plus the
/// URLs and per-writer clients the load generators use.
struct Api {
    base: String,
    /// Every base URL given; writers are spread over them.
    append_bases: Vec<String>,
    request_timeout: Duration,
    control: reqwest::Client,
}

#[derive(Deserialize)]
struct SessionHeader {
    id: String,
    last_seq: u64,
}

impl Api {
    fn new(urls: &str, request_timeout: Duration) -> Result<Self> {
        let mut bases = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|url| !url.is_empty()) {
            let base = url.trim_end_matches('/').to_owned();
            let parsed = Url::parse(&base).with_context(|| format!("invalid --url `{url}`"))?;
            if parsed.scheme() != "http" {
                bail!("invalid --url `{url}`: only http:// is supported");
            }
            bases.push(base);
        }
        let Some(base) = bases.first().cloned() else {
            bail!("--url is empty; give at least one http:// URL");
        };

        let control = Self::build_client(request_timeout, 4)?;
        Ok(Self {
            base,
            append_bases: bases,
            request_timeout,
            control,
        })
    }

    /// Builds a client for one writer. It keeps at most one idle connection,
    /// so a writer that sends one request at a time reuses one keep-alive
    /// connection.
    fn writer_client(&self) -> Result<reqwest::Client> {
        Self::build_client(self.request_timeout, 1)
    }

    fn build_client(request_timeout: Duration, idle_per_host: usize) -> Result<reqwest::Client> {
        reqwest::Client::builder()
            .pool_max_idle_per_host(idle_per_host)
            .tcp_nodelay(true)
            .timeout(request_timeout)
            .build()
            .context("failed to build the HTTP client")
    }

    /// Creates a session with a server-generated id and returns the id.
    async fn create_session(&self) -> Result<String> {
        let url = format!("{}/v1/sessions", self.base);
        let response = self
            .control
            .post(&url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body("{}")
            .send()
            .await
            .with_context(|| format!("POST {url} failed; is the server running?"))?;
        let body = expect_status(response, StatusCode::CREATED, "POST", &url).await?;

        let header: SessionHeader = serde_json::from_slice(&body)
            .with_context(|| format!("POST {url} returned an invalid session header"))?;
        Ok(header.id)
    }

    async fn create_sessions(&self, count: usize) -> Result<Vec<String>> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(self.create_session().await?);
        }
        Ok(ids)
    }

    /// Reads the session header and returns its `last_seq`.
    async fn last_seq(&self, session_id: &str) -> Result<u64> {
        let url = format!("{}/v1/sessions/{session_id}", self.base);
        let response = self
            .control
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url} failed"))?;
        let body = expect_status(response, StatusCode::OK, "GET", &url).await?;

        let header: SessionHeader = serde_json::from_slice(&body)
            .with_context(|| format!("GET {url} returned an invalid session header"))?;
        Ok(header.last_seq)
    }

    /// Append URL for writer `writer`, on the writer's server.
    fn append_url(&self, session_id: &str, writer: usize) -> Result<Url> {
        let base = &self.append_bases[writer % self.append_bases.len()];
        let url = format!("{base}/v1/sessions/{session_id}/append");
        Url::parse(&url).with_context(|| format!("invalid append URL `{url}`"))
    }

    /// Returns the `ws://` tail URL. `new` has checked that the base URL is `http://`.
    fn tail_url(&self, session_id: &str, cursor: u64) -> String {
        let host_and_path = self.base.trim_start_matches("http://");
        format!("ws://{host_and_path}/v1/sessions/{session_id}/tail?cursor={cursor}")
    }
}

/// Returns the response body when the status is `expected`, else an error
/// that shows the status and body.
async fn expect_status(
    response: reqwest::Response,
    expected: StatusCode,
    method: &str,
    url: &str,
) -> Result<Bytes> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("{method} {url}: failed to read the response body"))?;
    if status != expected {
        bail!(
            "{method} {url} returned {status} (expected {expected}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(body)
}

// ---------------------------------------------------------------------------
// Append load generation
// ---------------------------------------------------------------------------

/// A writer stops after this many failed requests in a row, so a dead server
/// ends a run quickly instead of producing a flood of errors.
const MAX_CONSECUTIVE_FAILURES: u32 = 100;

/// Send times of one writer in an open-loop run. Request `k` of writer
/// `index` is global request `k * writers + index`, sent at
/// `start + global / rate`, so the combined stream is evenly spaced.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    start: Instant,
    rate: f64,
    writers: u64,
    index: u64,
}

impl Schedule {
    fn send_time(&self, k: u64) -> Instant {
        let global = k * self.writers + self.index;
        self.start + Duration::from_secs_f64(global as f64 / self.rate)
    }

    /// Returns how many of this writer's requests are scheduled before `deadline`.
    fn sends_before(&self, deadline: Instant) -> u64 {
        let window = deadline.saturating_duration_since(self.start).as_secs_f64();
        let globals = (window * self.rate).ceil() as u64;
        globals.saturating_sub(self.index).div_ceil(self.writers)
    }
}

/// The request body of each append.
#[derive(Clone)]
enum BodySource {
    /// The same bytes every time (cheap to clone, no per-request allocation).
    Fixed(Bytes),
    /// A body whose payload carries `sent_us`, the send time in microseconds
    /// since `base`, so a tail reader can compute delivery latency.
    Stamped { base: Instant, pad: Arc<str> },
}

impl BodySource {
    fn fixed(payload_bytes: usize) -> Self {
        let body = format!(
            r#"{{"type":"bench","actor":"bench","payload":{{"pad":"{}"}}}}"#,
            "x".repeat(payload_bytes)
        );
        Self::Fixed(Bytes::from(body))
    }

    fn stamped(base: Instant, payload_bytes: usize) -> Self {
        Self::Stamped {
            base,
            pad: Arc::from("x".repeat(payload_bytes)),
        }
    }

    fn next_body(&self) -> Bytes {
        match self {
            Self::Fixed(body) => body.clone(),
            Self::Stamped { base, pad } => {
                let sent_us = base.elapsed().as_micros();
                let body = format!(
                    r#"{{"type":"bench","actor":"bench","payload":{{"sent_us":{sent_us},"pad":"{pad}"}}}}"#
                );
                Bytes::from(body)
            }
        }
    }
}

/// Everything one writer task needs. A writer sends one request at a time on
/// its own client and stops at `deadline` or after `max_sends` requests.
struct WriterPlan {
    client: reqwest::Client,
    url: Url,
    body: BodySource,
    schedule: Option<Schedule>,
    deadline: Instant,
    max_sends: u64,
    acked_total: Arc<AtomicU64>,
}

/// Results of one or more writers.
#[derive(Default)]
struct WriterStats {
    latencies_us: Vec<u64>,
    /// Open-loop only: how late each request left compared with its
    /// scheduled time. Values above a few milliseconds mean that a slow
    /// response held the writer past its next send time or that the
    /// generator could not keep up.
    send_lags_us: Vec<u64>,
    acked: u64,
    errors: BTreeMap<String, u64>,
    /// Open-loop requests that were due before the deadline but never sent
    /// because the writer fell behind its schedule.
    unsent: u64,
    writers_gave_up: u32,
    /// Highest `seq` in any 201 response. Only meaningful when every writer
    /// appends to the same session.
    max_acked_seq: u64,
}

impl WriterStats {
    fn merge(&mut self, other: WriterStats) {
        self.latencies_us.extend_from_slice(&other.latencies_us);
        self.send_lags_us.extend_from_slice(&other.send_lags_us);
        self.acked += other.acked;
        for (key, count) in other.errors {
            *self.errors.entry(key).or_default() += count;
        }
        self.unsent += other.unsent;
        self.writers_gave_up += other.writers_gave_up;
        self.max_acked_seq = self.max_acked_seq.max(other.max_acked_seq);
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The part of an append's 201 body that the bench reads.
#[derive(Deserialize)]
struct AppendAck {
    seq: u64,
}

enum Outcome {
    /// A 201 with the `seq` from its body, or `None` when the body had no valid `seq`.
    Acked(Option<u64>),
    Rejected(StatusCode),
    Failed(&'static str),
}

async fn send_append(client: &reqwest::Client, url: &Url, body: Bytes) -> Outcome {
    let sent = client
        .post(url.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(error) => return Outcome::Failed(classify_transport_error(&error)),
    };

    // The body must be read to the end, or the connection cannot be reused.
    let status = response.status();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => return Outcome::Failed(classify_transport_error(&error)),
    };

    if status == StatusCode::CREATED {
        let seq = serde_json::from_slice::<AppendAck>(&body)
            .ok()
            .map(|ack| ack.seq);
        Outcome::Acked(seq)
    } else {
        Outcome::Rejected(status)
    }
}

fn classify_transport_error(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect error"
    } else if error.is_body() || error.is_decode() {
        "response body error"
    } else {
        "transport error"
    }
}

/// Runs one writer until its deadline or send limit. In open-loop mode the
/// latency of request `k` is measured from its scheduled send time, so a
/// stall shows up in every request that was due during it.
async fn run_writer(plan: WriterPlan) -> WriterStats {
    let mut stats = WriterStats::default();
    let mut consecutive_failures = 0;

    for k in 0..plan.max_sends {
        let measured_from = match plan.schedule {
            Some(schedule) => {
                let due = schedule.send_time(k);
                if due >= plan.deadline {
                    break;
                }
                let now = Instant::now();
                if now >= plan.deadline {
                    let due_total = schedule.sends_before(plan.deadline).min(plan.max_sends);
                    stats.unsent = due_total.saturating_sub(k);
                    break;
                }
                // NOTE: tokio timers have millisecond resolution, so a send
                // usually leaves up to about 1 ms late. That lateness counts
                // as latency here and is reported separately as send lag.
                tokio::time::sleep_until(due).await;
                let lag = Instant::now().saturating_duration_since(due);
                stats.send_lags_us.push(lag.as_micros() as u64);
                due
            }
            None => {
                let now = Instant::now();
                if now >= plan.deadline {
                    break;
                }
                now
            }
        };

        let outcome = send_append(&plan.client, &plan.url, plan.body.next_body()).await;
        let latency_us = measured_from.elapsed().as_micros() as u64;

        match outcome {
            Outcome::Acked(seq) => {
                consecutive_failures = 0;
                stats.acked += 1;
                match seq {
                    Some(seq) => stats.max_acked_seq = stats.max_acked_seq.max(seq),
                    None => {
                        *stats
                            .errors
                            .entry("201 without a seq".to_owned())
                            .or_default() += 1
                    }
                }
                stats.latencies_us.push(latency_us);
                plan.acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Rejected(status) => {
                consecutive_failures += 1;
                *stats
                    .errors
                    .entry(format!("http {}", status.as_u16()))
                    .or_default() += 1;
            }
            Outcome::Failed(kind) => {
                consecutive_failures += 1;
                *stats.errors.entry(kind.to_owned()).or_default() += 1;
            }
        }

        if consecutive_failures >= MAX_CONSECUTIVE_FAILURES {
            stats.writers_gave_up = 1;
            break;
        }
    }
    stats
}

/// Runs the writers concurrently and merges their results.
async fn run_writers(plans: Vec<WriterPlan>) -> Result<WriterStats> {
    let handles: Vec<JoinHandle<WriterStats>> = plans
        .into_iter()
        .map(|plan| tokio::spawn(run_writer(plan)))
        .collect();

    let mut total = WriterStats::default();
    for handle in handles {
        total.merge(handle.await.context("a writer task panicked")?);
    }
    Ok(total)
}

/// Settings shared by every writer of one run.
struct LoadSpec<'a> {
    session_ids: &'a [String],
    writers: u32,
    body: BodySource,
    rate: Option<f64>,
    start: Instant,
    deadline: Instant,
    /// Total requests over all writers, or `u64::MAX` for a duration-bound run.
    total_sends: u64,
    acked_total: Arc<AtomicU64>,
}

/// Builds one plan per writer. Writer `i` uses session `i % sessions`, and
/// the total send count is split as evenly as possible.
fn plan_writers(api: &Api, spec: &LoadSpec<'_>) -> Result<Vec<WriterPlan>> {
    let writers = u64::from(spec.writers);
    let mut plans = Vec::with_capacity(spec.writers as usize);

    for index in 0..writers {
        let session_id = &spec.session_ids[index as usize % spec.session_ids.len()];
        let max_sends = if spec.total_sends == u64::MAX {
            u64::MAX
        } else {
            spec.total_sends / writers + u64::from(index < spec.total_sends % writers)
        };
        let schedule = spec.rate.map(|rate| Schedule {
            start: spec.start,
            rate,
            writers,
            index,
        });

        plans.push(WriterPlan {
            client: api.writer_client()?,
            url: api.append_url(session_id, index as usize)?,
            body: spec.body.clone(),
            schedule,
            deadline: spec.deadline,
            max_sends,
            acked_total: Arc::clone(&spec.acked_total),
        });
    }
    Ok(plans)
}

// ---------------------------------------------------------------------------
// Append scenario
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct AppendReport {
    scenario: String,
    writers: u32,
    sessions: usize,
    /// `closed_loop` or `open_loop`.
    mode: &'static str,
    target_rate: Option<f64>,
    payload_bytes: usize,
    elapsed_secs: f64,
    acked: u64,
    appends_per_sec: f64,
    latency: Option<LatencySummary>,
    /// Open-loop only: delay between each scheduled and actual send.
    send_lag: Option<LatencySummary>,
    /// Failed requests by HTTP status (`http 503`) or transport failure (`timeout`).
    errors: BTreeMap<String, u64>,
    unsent: u64,
    writers_gave_up: u32,
}

async fn run_append(api: &Api, args: &AppendArgs) -> Result<AppendReport> {
    let session_count = if args.same_session {
        1
    } else {
        args.writers as usize
    };
    let session_ids = api.create_sessions(session_count).await?;

    let start = Instant::now();
    let spec = LoadSpec {
        session_ids: &session_ids,
        writers: args.writers,
        body: BodySource::fixed(args.payload_bytes),
        rate: args.rate,
        start,
        deadline: start + Duration::from_secs_f64(args.duration_secs),
        total_sends: u64::MAX,
        acked_total: Arc::new(AtomicU64::new(0)),
    };
    let plans = plan_writers(api, &spec)?;
    let mut stats = run_writers(plans).await?;
    let elapsed_secs = start.elapsed().as_secs_f64();

    Ok(AppendReport {
        scenario: append_scenario_name(args),
        writers: args.writers,
        sessions: session_count,
        mode: if args.rate.is_some() {
            "open_loop"
        } else {
            "closed_loop"
        },
        target_rate: args.rate,
        payload_bytes: args.payload_bytes,
        elapsed_secs,
        acked: stats.acked,
        appends_per_sec: stats.acked as f64 / elapsed_secs,
        latency: LatencySummary::from_micros(&mut stats.latencies_us),
        send_lag: LatencySummary::from_micros(&mut stats.send_lags_us),
        errors: stats.errors,
        unsent: stats.unsent,
        writers_gave_up: stats.writers_gave_up,
    })
}

fn append_scenario_name(args: &AppendArgs) -> String {
    let sessions = if args.same_session {
        "one session"
    } else {
        "own sessions"
    };
    let mode = match args.rate {
        Some(rate) => format!("open loop {rate}/s"),
        None => "closed loop".to_owned(),
    };
    let writers = match args.writers {
        1 => "1 writer".to_owned(),
        count => format!("{count} writers"),
    };
    format!("append, {writers}, {sessions}, {mode}")
}

// ---------------------------------------------------------------------------
// Tail reading and order checks
// ---------------------------------------------------------------------------

type TailSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Violation messages kept per socket. The count covers all of them.
const MAX_VIOLATION_MESSAGES: usize = 10;

/// Checks that a socket delivers seqs `cursor + 1, cursor + 2, ...` exactly
/// once and in order.
#[derive(Debug)]
struct SeqChecker {
    next_expected: u64,
    received: u64,
    violation_count: u64,
    violations: Vec<String>,
}

impl SeqChecker {
    fn new(cursor: u64) -> Self {
        Self {
            next_expected: cursor + 1,
            received: 0,
            violation_count: 0,
            violations: Vec::new(),
        }
    }

    fn observe(&mut self, seq: u64) {
        self.received += 1;
        if seq == self.next_expected {
            self.next_expected += 1;
            return;
        }

        if seq < self.next_expected {
            self.record(format!(
                "duplicate or out-of-order seq {seq} after seq {}",
                self.next_expected - 1
            ));
        } else {
            self.record(format!(
                "gap: expected seq {}, received seq {seq}",
                self.next_expected
            ));
            // Resynchronise so that one gap is reported once, not on every later event.
            self.next_expected = seq + 1;
        }
    }

    fn record(&mut self, message: String) {
        self.violation_count += 1;
        if self.violations.len() < MAX_VIOLATION_MESSAGES {
            self.violations.push(message);
        }
    }

    /// Returns the highest seq delivered in order so far.
    fn last_seq(&self) -> u64 {
        self.next_expected - 1
    }
}

/// Condition for a tail reader to stop: it has received `target_seq`, or
/// `deadline` has passed.
#[derive(Clone, Copy, Debug)]
struct StopCondition {
    target_seq: u64,
    deadline: Instant,
}

/// The fields of a tail frame that the bench reads.
#[derive(Deserialize)]
struct TailFrame {
    seq: u64,
    #[serde(default)]
    payload: Option<StampedPayload>,
}

#[derive(Deserialize)]
struct StampedPayload {
    sent_us: Option<u64>,
}

struct TailReadResult {
    checker: SeqChecker,
    latencies_us: Vec<u64>,
    first_event_at: Option<Instant>,
    last_event_at: Option<Instant>,
    /// Reason the socket ended before the stop condition, if it did.
    ended_early: Option<String>,
}

async fn connect_tail(url: &str) -> Result<TailSocket> {
    let (socket, _response) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("failed to open tail socket {url}"))?;
    Ok(socket)
}

/// Reads tail frames until the stop condition in `stop` is met, the socket
/// ends, or the deadline passes. Until a stop condition is published the
/// reader waits for frames indefinitely, so the caller must publish one.
async fn read_tail(
    mut socket: TailSocket,
    cursor: u64,
    base: Instant,
    mut stop: watch::Receiver<Option<StopCondition>>,
) -> TailReadResult {
    let mut result = TailReadResult {
        checker: SeqChecker::new(cursor),
        latencies_us: Vec::new(),
        first_event_at: None,
        last_event_at: None,
        ended_early: None,
    };

    // One timer, re-armed when the stop condition arrives, instead of a new
    // timer per frame.
    let deadline_timer = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
    tokio::pin!(deadline_timer);
    let mut stop_condition = *stop.borrow_and_update();
    if let Some(condition) = stop_condition {
        deadline_timer.as_mut().reset(condition.deadline);
    }
    let mut stop_sender_alive = true;

    loop {
        if let Some(condition) = stop_condition {
            if result.checker.last_seq() >= condition.target_seq {
                break;
            }
        }

        tokio::select! {
            message = socket.next() => {
                let received_at = Instant::now();
                match message {
                    Some(Ok(Message::Text(text))) => {
                        observe_frame(&mut result, text.as_str(), received_at, base);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        result.ended_early = Some(format!("server closed the socket: {frame:?}"));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        result.ended_early = Some(format!("socket error: {error}"));
                        break;
                    }
                    None => {
                        result.ended_early = Some("socket ended without a close frame".to_owned());
                        break;
                    }
                }
            }
            changed = stop.changed(), if stop_sender_alive => {
                if changed.is_err() {
                    stop_sender_alive = false;
                    continue;
                }
                stop_condition = *stop.borrow_and_update();
                if let Some(condition) = stop_condition {
                    deadline_timer.as_mut().reset(condition.deadline);
                }
            }
            () = &mut deadline_timer => {
                result.ended_early = Some("timed out waiting for the remaining events".to_owned());
                break;
            }
        }
    }

    // Best effort: the result is complete whether or not the close frame goes out.
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    result
}

fn observe_frame(result: &mut TailReadResult, text: &str, received_at: Instant, base: Instant) {
    let frame: TailFrame = match serde_json::from_str(text) {
        Ok(frame) => frame,
        Err(error) => {
            result
                .checker
                .record(format!("invalid event frame ({error}): {text:.200}"));
            return;
        }
    };

    result.checker.observe(frame.seq);
    result.first_event_at.get_or_insert(received_at);
    result.last_event_at = Some(received_at);

    let sent_us = frame.payload.and_then(|payload| payload.sent_us);
    if let Some(sent_us) = sent_us {
        let received_us = received_at.duration_since(base).as_micros() as u64;
        result
            .latencies_us
            .push(received_us.saturating_sub(sent_us));
    }
}

/// Lists every way socket `index` broke the delivery contract: order
/// violations, plus missing events when it stopped short of `target_seq`.
fn socket_violations(index: usize, result: &TailReadResult, target_seq: u64) -> (u64, Vec<String>) {
    let mut count = result.checker.violation_count;
    let mut messages: Vec<String> = result
        .checker
        .violations
        .iter()
        .map(|message| format!("socket {index}: {message}"))
        .collect();

    let delivered = result.checker.last_seq();
    if delivered < target_seq || result.checker.received != target_seq {
        count += 1;
        let reason = result.ended_early.as_deref().unwrap_or("stopped");
        messages.push(format!(
            "socket {index}: received {} frames, in order up to seq {delivered}, expected seqs 1..={target_seq} ({reason})",
            result.checker.received
        ));
    }
    (count, messages)
}

// ---------------------------------------------------------------------------
// Tail scenario
// ---------------------------------------------------------------------------

/// Violation messages kept in a report. The count covers all of them.
const MAX_REPORTED_VIOLATIONS: usize = 50;

#[derive(Serialize)]
struct TailReport {
    scenario: String,
    session_id: String,
    sockets: u32,
    writers: u32,
    target_rate: f64,
    events_requested: u64,
    events_acked: u64,
    /// `last_seq` of the session after the appends. Every socket must receive 1..=last_seq.
    last_seq: u64,
    /// `session_header` when `last_seq` was read from the server, or
    /// `highest_ack` when that read failed and the highest acknowledged seq
    /// is used instead.
    last_seq_source: &'static str,
    append_elapsed_secs: f64,
    append_rate: f64,
    append_latency: Option<LatencySummary>,
    /// Delay between each scheduled and actual append send.
    append_send_lag: Option<LatencySummary>,
    append_errors: BTreeMap<String, u64>,
    deliveries: u64,
    deliveries_per_sec: f64,
    delivery_latency: Option<LatencySummary>,
    violation_count: u64,
    violations: Vec<String>,
}

async fn run_tail(api: &Api, args: &TailArgs) -> Result<TailReport> {
    let session_id = api.create_session().await?;
    let base = Instant::now();

    let (stop_sender, stop_receiver) = watch::channel(None);
    let readers = open_tail_readers(api, &session_id, args.sockets, base, &stop_receiver).await?;

    let append_start = Instant::now();
    let expected_secs = args.events as f64 / args.rate;
    let spec = LoadSpec {
        session_ids: std::slice::from_ref(&session_id),
        writers: args.writers,
        body: BodySource::stamped(base, args.payload_bytes),
        rate: Some(args.rate),
        start: append_start,
        // Bounded even if the server is slow: twice the planned time plus the drain timeout.
        deadline: append_start
            + Duration::from_secs_f64(2.0 * expected_secs + args.drain_timeout_secs),
        total_sends: args.events,
        acked_total: Arc::new(AtomicU64::new(0)),
    };
    let mut append_stats = run_writers(plan_writers(api, &spec)?).await?;
    let append_elapsed_secs = append_start.elapsed().as_secs_f64();

    let (last_seq, last_seq_source) = match api.last_seq(&session_id).await {
        Ok(last_seq) => (last_seq, "session_header"),
        Err(error) => {
            eprintln!(
                "warning: {error:#}. Checking delivery up to the highest acknowledged seq, {}.",
                append_stats.max_acked_seq
            );
            (append_stats.max_acked_seq, "highest_ack")
        }
    };
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout_secs);
    let _ = stop_sender.send(Some(StopCondition {
        target_seq: last_seq,
        deadline: drain_deadline,
    }));

    let mut report = TailReport {
        scenario: format!("tail, {} sockets, {} events/s", args.sockets, args.rate),
        session_id,
        sockets: args.sockets,
        writers: args.writers,
        target_rate: args.rate,
        events_requested: args.events,
        events_acked: append_stats.acked,
        last_seq,
        last_seq_source,
        append_elapsed_secs,
        append_rate: append_stats.acked as f64 / append_elapsed_secs,
        append_latency: LatencySummary::from_micros(&mut append_stats.latencies_us),
        append_send_lag: LatencySummary::from_micros(&mut append_stats.send_lags_us),
        append_errors: append_stats.errors,
        deliveries: 0,
        deliveries_per_sec: 0.0,
        delivery_latency: None,
        violation_count: 0,
        violations: Vec::new(),
    };

    if last_seq < append_stats.max_acked_seq {
        report.violation_count += 1;
        report.violations.push(format!(
            "session last_seq {last_seq} is below the highest acknowledged seq {}",
            append_stats.max_acked_seq
        ));
    }

    let mut latencies_us = Vec::new();
    for (index, reader) in readers.into_iter().enumerate() {
        let result = reader.await.context("a tail reader task panicked")?;
        report.deliveries += result.checker.received;
        latencies_us.extend_from_slice(&result.latencies_us);

        let (count, messages) = socket_violations(index, &result, last_seq);
        report.violation_count += count;
        let room = MAX_REPORTED_VIOLATIONS.saturating_sub(report.violations.len());
        report.violations.extend(messages.into_iter().take(room));
    }
    report.deliveries_per_sec = report.deliveries as f64 / append_elapsed_secs;
    report.delivery_latency = LatencySummary::from_micros(&mut latencies_us);
    Ok(report)
}

/// Opens `sockets` tail connections at cursor 0 and starts a reader task on each.
async fn open_tail_readers(
    api: &Api,
    session_id: &str,
    sockets: u32,
    base: Instant,
    stop: &watch::Receiver<Option<StopCondition>>,
) -> Result<Vec<JoinHandle<TailReadResult>>> {
    let url = api.tail_url(session_id, 0);
    let mut readers = Vec::with_capacity(sockets as usize);
    for _ in 0..sockets {
        let socket = connect_tail(&url).await?;
        readers.push(tokio::spawn(read_tail(socket, 0, base, stop.clone())));
    }
    Ok(readers)
}

// ---------------------------------------------------------------------------
// Replay scenario
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct ReplayReport {
    scenario: String,
    session_id: String,
    /// `last_seq` of the session, which is the number of events replayed.
    events: u64,
    setup_appended: u64,
    setup_secs: f64,
    setup_errors: BTreeMap<String, u64>,
    /// From starting the WebSocket handshake to the first event.
    first_event_ms: Option<f64>,
    /// From starting the WebSocket handshake to the last event.
    receive_secs: f64,
    events_per_sec: f64,
    violation_count: u64,
    violations: Vec<String>,
}

async fn run_replay(api: &Api, args: &ReplayArgs) -> Result<ReplayReport> {
    let session_id = match &args.session {
        Some(id) => id.clone(),
        None => api.create_session().await?,
    };

    let existing = api.last_seq(&session_id).await?;
    let missing = args.events.saturating_sub(existing);
    let setup_start = Instant::now();
    let setup_stats = fill_session(api, &session_id, missing, args).await?;
    let setup_secs = setup_start.elapsed().as_secs_f64();

    let last_seq = api.last_seq(&session_id).await?;
    if last_seq == 0 {
        bail!(
            "session {session_id} has no events to replay after the setup appends (errors: {})",
            format_errors(&setup_stats.errors)
        );
    }

    let receive_start = Instant::now();
    let socket = connect_tail(&api.tail_url(&session_id, 0)).await?;
    let (_stop_sender, stop_receiver) = watch::channel(Some(StopCondition {
        target_seq: last_seq,
        deadline: receive_start + Duration::from_secs_f64(args.timeout_secs),
    }));
    let result = read_tail(socket, 0, receive_start, stop_receiver).await;

    let receive_secs = result
        .last_event_at
        .map_or(0.0, |at| at.duration_since(receive_start).as_secs_f64());
    let first_event_ms = result
        .first_event_at
        .map(|at| at.duration_since(receive_start).as_secs_f64() * 1000.0);
    let (violation_count, violations) = socket_violations(0, &result, last_seq);

    Ok(ReplayReport {
        scenario: format!("replay, {last_seq} events, one socket"),
        session_id,
        events: last_seq,
        setup_appended: setup_stats.acked,
        setup_secs,
        setup_errors: setup_stats.errors,
        first_event_ms,
        receive_secs,
        events_per_sec: if receive_secs > 0.0 {
            result.checker.received as f64 / receive_secs
        } else {
            0.0
        },
        violation_count,
        violations,
    })
}

/// Appends `count` events to the session over `args.setup_connections`
/// concurrent connections, with progress on stderr once a second.
async fn fill_session(
    api: &Api,
    session_id: &str,
    count: u64,
    args: &ReplayArgs,
) -> Result<WriterStats> {
    if count == 0 {
        return Ok(WriterStats::default());
    }

    let session_ids = [session_id.to_owned()];
    let acked_total = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let spec = LoadSpec {
        session_ids: &session_ids,
        writers: args.setup_connections,
        body: BodySource::fixed(args.payload_bytes),
        rate: None,
        start,
        deadline: start + Duration::from_secs_f64(args.timeout_secs),
        total_sends: count,
        acked_total: Arc::clone(&acked_total),
    };
    let plans = plan_writers(api, &spec)?;

    let progress = tokio::spawn(report_progress(acked_total, count));
    let stats = run_writers(plans).await;
    progress.abort();

    let stats = stats?;
    eprintln!(
        "replay setup: appended {} of {count} events in {:.1} s ({} errors)",
        stats.acked,
        start.elapsed().as_secs_f64(),
        stats.error_count()
    );
    Ok(stats)
}

async fn report_progress(acked_total: Arc<AtomicU64>, count: u64) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let acked = acked_total.load(Ordering::Relaxed);
        eprintln!("replay setup: {acked}/{count} events appended");
    }
}

// ---------------------------------------------------------------------------
// Standard suite
// ---------------------------------------------------------------------------

/// Runs the standard suite in order, printing each report as it finishes.
async fn run_all(api: &Api, args: &AllArgs, output: &Output) -> Result<Vec<Report>> {
    let append_cases = [
        (1, false, None),
        (16, false, None),
        (64, false, None),
        (64, true, None),
        (64, false, Some(10_000.0)),
    ];

    let mut reports = Vec::new();
    for (writers, same_session, rate) in append_cases {
        let append = AppendArgs {
            writers,
            duration_secs: args.duration_secs,
            same_session,
            rate,
            payload_bytes: args.payload_bytes,
        };
        eprintln!("running: {}", append_scenario_name(&append));
        let report = Report::Append(run_append(api, &append).await?);
        output.human(&report.to_text());
        reports.push(report);
    }

    let tail = TailArgs {
        sockets: 100,
        events: args.tail_events,
        rate: 2_000.0,
        writers: 16,
        payload_bytes: args.payload_bytes,
        drain_timeout_secs: 30.0,
    };
    eprintln!("running: tail, {} sockets", tail.sockets);
    let report = Report::Tail(run_tail(api, &tail).await?);
    output.human(&report.to_text());
    reports.push(report);

    let replay = ReplayArgs {
        events: args.replay_events,
        session: args.replay_session.clone(),
        setup_connections: 32,
        payload_bytes: args.payload_bytes,
        timeout_secs: 300.0,
    };
    eprintln!("running: replay, {} events", replay.events);
    let report = Report::Replay(run_replay(api, &replay).await?);
    output.human(&report.to_text());
    reports.push(report);

    Ok(reports)
}

// ---------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Report {
    Append(AppendReport),
    Tail(TailReport),
    Replay(ReplayReport),
}

impl Report {
    fn passed(&self) -> bool {
        match self {
            Self::Append(_) => true,
            Self::Tail(report) => report.violation_count == 0,
            Self::Replay(report) => report.violation_count == 0,
        }
    }

    fn to_text(&self) -> String {
        match self {
            Self::Append(report) => append_text(report),
            Self::Tail(report) => tail_text(report),
            Self::Replay(report) => replay_text(report),
        }
    }

    /// Returns the cells of this report's row in the suite table.
    fn table_row(&self) -> [String; 7] {
        let (name, rate, latency, problems) = match self {
            Self::Append(report) => {
                let mut problems = format_errors(&report.errors);
                if report.unsent > 0 {
                    problems.push_str(&format!(", {} unsent", report.unsent));
                }
                (
                    report.scenario.clone(),
                    format!("{:.0} appends/s", report.appends_per_sec),
                    report.latency.as_ref(),
                    problems,
                )
            }
            Self::Tail(report) => (
                report.scenario.clone(),
                format!("{:.0} deliveries/s", report.deliveries_per_sec),
                report.delivery_latency.as_ref(),
                format!(
                    "{} violations; appends: {}",
                    report.violation_count,
                    format_errors(&report.append_errors)
                ),
            ),
            Self::Replay(report) => (
                report.scenario.clone(),
                format!("{:.0} events/s", report.events_per_sec),
                None,
                format!("{} violations", report.violation_count),
            ),
        };

        let cell = |pick: fn(&LatencySummary) -> f64| {
            latency.map_or_else(|| "-".to_owned(), |summary| format!("{:.2}", pick(summary)))
        };
        [
            name,
            rate,
            cell(|summary| summary.p50_ms),
            cell(|summary| summary.p95_ms),
            cell(|summary| summary.p99_ms),
            cell(|summary| summary.max_ms),
            problems,
        ]
    }
}

fn markdown_table(reports: &[Report]) -> String {
    let mut table = String::new();
    table.push_str("| Scenario | Throughput | p50 ms | p95 ms | p99 ms | max ms | Errors |\n");
    table.push_str("|---|---|---|---|---|---|---|\n");
    for report in reports {
        let _ = writeln!(table, "| {} |", report.table_row().join(" | "));
    }
    table
}

fn format_errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".to_owned();
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|(kind, count)| format!("{kind}: {count}"))
        .collect();
    parts.join(", ")
}

fn format_latency(latency: Option<&LatencySummary>) -> String {
    match latency {
        Some(summary) => format!(
            "p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}  (ms, {} samples)",
            summary.p50_ms, summary.p95_ms, summary.p99_ms, summary.max_ms, summary.count
        ),
        None => "no samples".to_owned(),
    }
}

fn append_text(report: &AppendReport) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "{} ({:.1} s)", report.scenario, report.elapsed_secs);
    let _ = writeln!(
        text,
        "  acked {} = {:.1} appends/s, unsent {}, writers that gave up {}",
        report.acked, report.appends_per_sec, report.unsent, report.writers_gave_up
    );
    let _ = writeln!(
        text,
        "  latency: {}",
        format_latency(report.latency.as_ref())
    );
    if report.send_lag.is_some() {
        let _ = writeln!(
            text,
            "  send lag: {}",
            format_latency(report.send_lag.as_ref())
        );
    }
    let _ = write!(text, "  errors: {}", format_errors(&report.errors));
    text
}

fn tail_text(report: &TailReport) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "{} (session {})", report.scenario, report.session_id);
    let _ = writeln!(
        text,
        "  appended {} of {} in {:.1} s = {:.1}/s, last_seq {}, errors: {}",
        report.events_acked,
        report.events_requested,
        report.append_elapsed_secs,
        report.append_rate,
        report.last_seq,
        format_errors(&report.append_errors)
    );
    let _ = writeln!(
        text,
        "  append latency: {}",
        format_latency(report.append_latency.as_ref())
    );
    let _ = writeln!(
        text,
        "  append send lag: {}",
        format_latency(report.append_send_lag.as_ref())
    );
    let _ = writeln!(
        text,
        "  deliveries {} = {:.1}/s, delivery latency: {}",
        report.deliveries,
        report.deliveries_per_sec,
        format_latency(report.delivery_latency.as_ref())
    );
    let _ = write!(
        text,
        "{}",
        violations_text(report.violation_count, &report.violations)
    );
    text
}

fn replay_text(report: &ReplayReport) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "{} (session {})", report.scenario, report.session_id);
    let _ = writeln!(
        text,
        "  setup appended {} in {:.1} s, errors: {}",
        report.setup_appended,
        report.setup_secs,
        format_errors(&report.setup_errors)
    );
    let first = report
        .first_event_ms
        .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
    let _ = writeln!(
        text,
        "  received {} events in {:.3} s = {:.0} events/s, first event after {first}",
        report.events, report.receive_secs, report.events_per_sec
    );
    let _ = write!(
        text,
        "{}",
        violations_text(report.violation_count, &report.violations)
    );
    text
}

fn violations_text(count: u64, violations: &[String]) -> String {
    if count == 0 {
        return "  order check: every socket received every seq exactly once, in order".to_owned();
    }
    let mut text = format!("  ORDER CHECK FAILED: {count} violations");
    for violation in violations {
        let _ = write!(text, "\n    {violation}");
    }
    if (violations.len() as u64) < count {
        let _ = write!(text, "\n    ... {} more", count - violations.len() as u64);
    }
    text
}

// ---------------------------------------------------------------------------
// Latency statistics
// ---------------------------------------------------------------------------

#[derive(Serialize, Debug, PartialEq)]
struct LatencySummary {
    count: usize,
    mean_ms: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl LatencySummary {
    /// Sorts the samples in place and summarises them. Returns `None` when
    /// there are no samples.
    fn from_micros(samples_us: &mut [u64]) -> Option<Self> {
        if samples_us.is_empty() {
            return None;
        }
        samples_us.sort_unstable();

        let to_ms = |micros: u64| micros as f64 / 1000.0;
        let sum: u128 = samples_us.iter().map(|&sample| u128::from(sample)).sum();
        Some(Self {
            count: samples_us.len(),
            mean_ms: sum as f64 / samples_us.len() as f64 / 1000.0,
            p50_ms: to_ms(percentile(samples_us, 50.0)),
            p95_ms: to_ms(percentile(samples_us, 95.0)),
            p99_ms: to_ms(percentile(samples_us, 99.0)),
            max_ms: to_ms(samples_us[samples_us.len() - 1]),
        })
    }
}

/// Returns the nearest-rank percentile of sorted, non-empty samples: the
/// smallest sample with at least `percent`% of samples at or below it.
fn percentile(sorted: &[u64], percent: f64) -> u64 {
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), 50, "p50 of 1..=100 is 50");
        assert_eq!(percentile(&samples, 99.0), 99, "p99 of 1..=100 is 99");
        assert_eq!(percentile(&samples, 100.0), 100, "p100 is the max");
        assert_eq!(
            percentile(&[7], 1.0),
            7,
            "a single sample is every percentile"
        );
    }

    #[test]
    fn summary_empty_is_none() {
        assert!(
            LatencySummary::from_micros(&mut []).is_none(),
            "no samples give no summary"
        );
    }

    #[test]
    fn summary_sorts_and_converts() {
        let mut samples = vec![3_000, 1_000, 2_000];
        let summary = LatencySummary::from_micros(&mut samples).expect("samples present");
        assert_eq!(summary.p50_ms, 2.0, "median of 1, 2, 3 ms");
        assert_eq!(summary.max_ms, 3.0, "max of 1, 2, 3 ms");
        assert_eq!(summary.mean_ms, 2.0, "mean of 1, 2, 3 ms");
    }

    #[test]
    fn schedule_spreads_writers() {
        let start = Instant::now();
        let writer_one = Schedule {
            start,
            rate: 1_000.0,
            writers: 4,
            index: 1,
        };
        assert_eq!(
            writer_one.send_time(0) - start,
            Duration::from_millis(1),
            "writer 1 starts one global interval after writer 0"
        );
        assert_eq!(
            writer_one.send_time(2) - start,
            Duration::from_millis(9),
            "request 2 of writer 1 is global request 9"
        );
    }

    #[test]
    fn schedule_counts_sends_before_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(10);
        let writer_zero = Schedule {
            start,
            rate: 1_000.0,
            writers: 4,
            index: 0,
        };
        let writer_three = Schedule {
            start,
            rate: 1_000.0,
            writers: 4,
            index: 3,
        };
        // Global requests 0..10 are due before 10 ms: writer 0 gets 0, 4, 8 and writer 3 gets 3, 7.
        assert_eq!(
            writer_zero.sends_before(deadline),
            3,
            "writer 0 sends 0, 4, 8"
        );
        assert_eq!(
            writer_three.sends_before(deadline),
            2,
            "writer 3 sends 3, 7"
        );
    }

    #[test]
    fn checker_accepts_in_order() {
        let mut checker = SeqChecker::new(0);
        for seq in 1..=5 {
            checker.observe(seq);
        }
        assert_eq!(
            checker.violation_count, 0,
            "1..=5 in order has no violations"
        );
        assert_eq!(checker.last_seq(), 5, "last in-order seq");
    }

    #[test]
    fn checker_reports_gap_once() {
        let mut checker = SeqChecker::new(0);
        for seq in [1, 3, 4, 5] {
            checker.observe(seq);
        }
        assert_eq!(
            checker.violation_count, 1,
            "a missing seq 2 is one violation"
        );
        assert!(
            checker.violations[0].contains("expected seq 2"),
            "message names the missing seq"
        );
    }

    #[test]
    fn checker_reports_duplicate() {
        let mut checker = SeqChecker::new(0);
        for seq in [1, 2, 2, 3] {
            checker.observe(seq);
        }
        assert_eq!(
            checker.violation_count, 1,
            "a repeated seq 2 is one violation"
        );
        assert_eq!(
            checker.last_seq(),
            3,
            "delivery continues after the duplicate"
        );
    }

    #[test]
    fn socket_short_is_violation() {
        let mut checker = SeqChecker::new(0);
        checker.observe(1);
        let result = TailReadResult {
            checker,
            latencies_us: Vec::new(),
            first_event_at: None,
            last_event_at: None,
            ended_early: Some("timed out".to_owned()),
        };
        let (count, messages) = socket_violations(3, &result, 2);
        assert_eq!(count, 1, "one of two events missing is one violation");
        assert!(
            messages[0].starts_with("socket 3:"),
            "message names the socket: {messages:?}"
        );
    }

    #[test]
    fn fixed_body_is_valid_json() {
        let BodySource::Fixed(body) = BodySource::fixed(8) else {
            panic!("fixed() returns a fixed body");
        };
        let value: serde_json::Value = serde_json::from_slice(&body).expect("body parses as JSON");
        assert_eq!(
            value["payload"]["pad"], "xxxxxxxx",
            "pad has the requested length"
        );
    }

    #[test]
    fn stamped_body_carries_time() {
        let body = BodySource::stamped(Instant::now(), 4).next_body();
        let value: serde_json::Value = serde_json::from_slice(&body).expect("body parses as JSON");
        assert!(
            value["payload"]["sent_us"].is_u64(),
            "payload carries sent_us: {value}"
        );
    }
}

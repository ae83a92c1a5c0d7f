//! `starcite-tail`: prints a session's events from a tail WebSocket, one
//! JSON frame per line, until the server closes the socket or Ctrl-C.
//! Exits 0 when the tail ends normally (close code 1000 or 1001, a close
//! without a code, or the stream ending) and quietly with 0 when its output
//! is closed (piped into `head`, say). Exits 1 on any other close code and
//! when connecting or reading fails.
//!
//! Any WebSocket client can tail a session; this one ships with the server
//! so a first session needs nothing else installed.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// Print the events of a Starcite session tail, one JSON object per line.
#[derive(Debug, Parser)]
#[command(name = "starcite-tail", version)]
struct Args {
    /// Tail URL, for example ws://localhost:4000/v1/sessions/ses_demo/tail?cursor=0
    url: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();

    let (mut socket, _) = match tokio_tungstenite::connect_async(args.url.as_str()).await {
        Ok(connected) => connected,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
                .unwrap_or_default();
            eprintln!("tail refused with HTTP {}: {body}", response.status());
            return ExitCode::FAILURE;
        }
        Err(err) => {
            eprintln!("connecting to {} failed: {err}", args.url);
            return ExitCode::FAILURE;
        }
    };

    while let Some(message) = socket.next().await {
        match message {
            Ok(Message::Text(frame)) => {
                let mut stdout = std::io::stdout().lock();
                if writeln!(stdout, "{frame}")
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    // The reader went away; nothing is left to print for.
                    // NOTE: checked by hand through `| head -n 1`; no test
                    // covers it, because a tail this short fits in the pipe
                    // buffer and never hits the closed pipe.
                    return ExitCode::SUCCESS;
                }
            }
            Ok(Message::Close(frame)) => {
                let Some(frame) = frame else {
                    eprintln!("server closed the tail");
                    return ExitCode::SUCCESS;
                };
                let code = u16::from(frame.code);
                eprintln!("server closed the tail: {code} {}", frame.reason);
                return if matches!(code, 1000 | 1001) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                };
            }
            Ok(_) => {}
            Err(err) => {
                eprintln!("tail failed: {err}; reconnect with the last seq printed as cursor");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

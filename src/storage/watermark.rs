//! A record, outside the storage engine, of how far each shard's Raft log
//! was durable, used to detect logs that lost acknowledged entries.
//!
//! The engine's journal recovery cuts a journal at the first record it
//! cannot decode. At the real end of the journal that is right (a torn
//! write that was never acknowledged), but damage in the middle makes it
//! drop every later, valid record without an error. Comparing the recovered
//! logs with this file turns that silent loss into a refusal to start.
//!
//! The file lags one fsync group behind the journal, so losing only the
//! newest group (the torn tail of a crash) is accepted. It never claims more
//! than each shard's committed index either: in a cluster, Raft may replace
//! a follower's durable but uncommitted entries, never committed ones. It is also written
//! at most every [`WRITE_INTERVAL`], by its own thread so that its fsyncs
//! never delay a group commit, so damage to the newest entries within that
//! window goes undetected.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::error;

/// Minimum time between two writes of the file.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(100);

const FILE_NAME: &str = "durable-watermark";
const HEADER: &str = "starcite durable watermark v1";

/// Last durable log index per shard.
pub type Watermark = BTreeMap<u32, u64>;

/// Path of the watermark file in a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Replaces the file atomically: write a temporary file, fsync it, rename it
/// over the old one, fsync the directory.
pub fn write(data_dir: &Path, watermark: &Watermark) -> std::io::Result<()> {
    let mut text = format!("{HEADER}\n");
    for (shard, index) in watermark {
        text.push_str(&format!("{shard} {index}\n"));
    }

    let temporary = data_dir.join(format!("{FILE_NAME}.tmp"));
    let mut file = File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(&temporary, path(data_dir))?;
    File::open(data_dir)?.sync_all()
}

/// Reads the file; `None` when the data directory has none yet.
pub fn read(data_dir: &Path) -> Result<Option<Watermark>, String> {
    let text = match fs::read_to_string(path(data_dir)) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(format!(
                "reading {} failed: {err}",
                path(data_dir).display()
            ))
        }
    };

    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!(
            "{} does not start with {HEADER:?}",
            path(data_dir).display()
        ));
    }
    let mut watermark = Watermark::new();
    for line in lines {
        let parsed = line
            .split_once(' ')
            .and_then(|(shard, index)| Some((shard.parse().ok()?, index.parse().ok()?)));
        let Some((shard, index)) = parsed else {
            return Err(format!(
                "{} has an invalid line {line:?}",
                path(data_dir).display()
            ));
        };
        watermark.insert(shard, index);
    }
    Ok(Some(watermark))
}

/// Thread that writes the newest published watermark, at most every
/// [`WRITE_INTERVAL`]; values published in between replace each other.
pub struct WatermarkWriter {
    shared: Arc<WriterShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct WriterState {
    pending: Option<Watermark>,
    stopping: bool,
}

#[derive(Default)]
struct WriterShared {
    state: Mutex<WriterState>,
    wakeup: Condvar,
}

impl WriterShared {
    fn lock(&self) -> MutexGuard<'_, WriterState> {
        // Each critical section is a single field update, so a poisoned lock is intact.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl WatermarkWriter {
    pub fn start(data_dir: PathBuf) -> std::io::Result<WatermarkWriter> {
        let shared = Arc::new(WriterShared::default());
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("starcite-watermark".into())
            .spawn(move || write_loop(&worker, &data_dir))?;
        Ok(WatermarkWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `watermark` to be written, replacing any value not yet written.
    pub fn publish(&self, watermark: Watermark) {
        self.shared.lock().pending = Some(watermark);
        self.shared.wakeup.notify_one();
    }

    /// Writes the last published value, then stops the thread.
    pub fn stop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wakeup.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("watermark writer thread panicked");
            }
        }
    }
}

fn write_loop(shared: &WriterShared, data_dir: &Path) {
    loop {
        let (pending, stopping) = {
            let mut state = shared.lock();
            while state.pending.is_none() && !state.stopping {
                state = shared
                    .wakeup
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            (state.pending.take(), state.stopping)
        };

        if let Some(watermark) = pending {
            if let Err(err) = write(data_dir, &watermark) {
                error!(error = %err, "writing the durable watermark failed");
            }
        }
        if stopping {
            return;
        }
        std::thread::sleep(WRITE_INTERVAL);
    }
}

/// Compares the recovered end of each shard's log with the watermark and
/// describes every shard whose log ends before it.
pub fn find_lost_entries(watermark: &Watermark, recovered: &BTreeMap<u32, u64>) -> Vec<String> {
    watermark
        .iter()
        .filter_map(|(shard, durable)| {
            let found = recovered.get(shard).copied().unwrap_or(0);
            (found < *durable).then(|| {
                format!("shard {shard}: log ends at index {found} but index {durable} was durable")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let watermark = Watermark::from([(0, 10), (3, 7)]);
        write(dir.path(), &watermark).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(watermark));
    }

    #[test]
    fn shorter_log_is_reported() {
        let watermark = Watermark::from([(0, 10), (1, 5)]);
        let recovered = BTreeMap::from([(0, 10), (1, 4)]);
        let lost = find_lost_entries(&watermark, &recovered);
        assert_eq!(lost.len(), 1);
        assert!(lost[0].contains("shard 1"), "{lost:?}");
    }

    #[test]
    fn longer_log_is_fine() {
        let watermark = Watermark::from([(0, 10)]);
        let recovered = BTreeMap::from([(0, 12)]);
        assert!(find_lost_entries(&watermark, &recovered).is_empty());
    }
}

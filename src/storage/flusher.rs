//! Group commit: one fsync for every log append that is waiting.
//!
//! Raft log appends write into the shared journal and then register here.
//! A single thread repeatedly takes every registration made so far, persists
//! the journal once, and reports the result to each of them. While one fsync
//! runs, new appends queue up for the next, so the number of fsyncs per second
//! stays near the disk's limit while the number of appends per fsync grows
//! with load.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tracing::{error, info};

use super::watermark::{self, Watermark, WatermarkWriter};
use super::Store;

/// Called once the entries it was registered for are durable, or with the
/// error that prevented it.
pub type FlushCallback = Box<dyn FnOnce(Result<(), io::Error>) + Send>;

struct Waiter {
    shard: u32,
    last_index: u64,
    entries: usize,
    callback: FlushCallback,
}

#[derive(Default)]
struct Queue {
    waiters: Vec<Waiter>,
    stopping: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wakeup: Condvar,
}

/// Handle to the group-commit thread. Cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    shared: Arc<Shared>,
    committed: Committed,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Highest committed log index per shard, as reported by the log stores.
///
/// The watermark never claims more than this: on a cluster follower, durable
/// entries past the commit point may still be replaced by the leader (Raft
/// truncates conflicting uncommitted entries), while committed ones never are.
#[derive(Clone, Default)]
struct Committed(Arc<Mutex<Watermark>>);

impl Committed {
    fn raise(&self, shard: u32, index: u64) {
        let mut committed = lock(&self.0);
        let entry = committed.entry(shard).or_insert(0);
        *entry = (*entry).max(index);
    }

    /// `durable`, capped per shard by the committed index.
    fn cap(&self, durable: &Watermark) -> Watermark {
        let committed = lock(&self.0);
        durable
            .iter()
            .map(|(shard, index)| {
                let limit = committed.get(shard).copied().unwrap_or(0);
                (*shard, (*index).min(limit))
            })
            .collect()
    }
}

impl Flusher {
    /// Starts the flush thread for `store`, which keeps the durable
    /// watermark of `data_dir` up to date.
    pub fn start(store: Store, data_dir: PathBuf) -> io::Result<Flusher> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wakeup: Condvar::new(),
        });

        // Whatever the file recorded was committed when it was written.
        let recorded = watermark::read(&data_dir)
            .ok()
            .flatten()
            .unwrap_or_default();
        let committed = Committed(Arc::new(Mutex::new(recorded)));

        let worker_shared = shared.clone();
        let worker_committed = committed.clone();
        let thread = std::thread::Builder::new()
            .name("starcite-fsync".into())
            .spawn(move || run(&worker_shared, &worker_committed, &store, &data_dir))?;

        info!("group commit thread started");
        Ok(Flusher {
            shared,
            committed,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Records that shard `shard`'s log is committed up to `index`, which
    /// lets the watermark claim entries up to there.
    pub fn committed(&self, shard: u32, index: u64) {
        self.committed.raise(shard, index);
    }

    /// Registers `callback` to run after the next fsync that starts from now
    /// on, which makes shard `shard`'s log durable up to `last_index`.
    /// `entries` is only used for the batch-size metric.
    pub fn request(&self, shard: u32, last_index: u64, entries: usize, callback: FlushCallback) {
        let mut queue = lock(&self.shared.queue);
        if queue.stopping {
            drop(queue);
            callback(Err(io::Error::other("storage is shutting down")));
            return;
        }
        queue.waiters.push(Waiter {
            shard,
            last_index,
            entries,
            callback,
        });
        drop(queue);
        self.shared.wakeup.notify_one();
    }

    /// Flushes what is queued, then stops the thread and waits for it.
    pub fn stop(&self) {
        lock(&self.shared.queue).stopping = true;
        self.shared.wakeup.notify_one();
        if let Some(thread) = lock(&self.thread).take() {
            if thread.join().is_err() {
                error!("group commit thread panicked");
            }
        }
        info!("group commit thread stopped");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the queue half-updated
    // (push and take are single operations), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Durable log positions: `lagging`, one fsync group behind `latest`, is
/// what the watermark file may claim.
struct Progress {
    latest: Watermark,
    lagging: Watermark,
    committed: Committed,
    /// Last value handed to the writer.
    published: Watermark,
    writer: WatermarkWriter,
}

impl Progress {
    fn advance(&mut self, batch: &[Waiter]) {
        self.lagging = self.latest.clone();
        for waiter in batch {
            let index = self.latest.entry(waiter.shard).or_insert(0);
            *index = (*index).max(waiter.last_index);
        }
        let claim = self.committed.cap(&self.lagging);
        if claim != self.published {
            self.published = claim.clone();
            self.writer.publish(claim);
        }
    }
}

fn run(shared: &Shared, committed: &Committed, store: &Store, data_dir: &Path) {
    // Start from the file, so shards that stay idle after a restart keep
    // their recorded position.
    let recorded = match watermark::read(data_dir) {
        Ok(recorded) => recorded.unwrap_or_default(),
        Err(err) => {
            error!(error = %err, "reading the durable watermark failed; starting a new one");
            Watermark::new()
        }
    };
    let writer = match WatermarkWriter::start(data_dir.to_path_buf()) {
        Ok(writer) => writer,
        Err(err) => {
            error!(error = %err, "starting the watermark writer failed; failing every append");
            fail_all(shared, &err.to_string());
            return;
        }
    };
    let mut progress = Progress {
        latest: recorded.clone(),
        lagging: recorded.clone(),
        committed: committed.clone(),
        published: recorded,
        writer,
    };

    loop {
        let (batch, stopping) = take_batch(shared);
        if !batch.is_empty() {
            flush(store, batch, &mut progress);
        }
        if stopping {
            progress.writer.stop();
            return;
        }
    }
}

/// Fails every waiter, now and later, when the thread cannot work at all.
fn fail_all(shared: &Shared, reason: &str) {
    loop {
        let (batch, stopping) = take_batch(shared);
        for waiter in batch {
            (waiter.callback)(Err(io::Error::other(reason.to_string())));
        }
        if stopping {
            return;
        }
    }
}

/// Waits until at least one waiter is queued (or stop was requested) and
/// takes the whole queue.
fn take_batch(shared: &Shared) -> (Vec<Waiter>, bool) {
    let mut queue = lock(&shared.queue);
    while queue.waiters.is_empty() && !queue.stopping {
        queue = shared
            .wakeup
            .wait(queue)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    (std::mem::take(&mut queue.waiters), queue.stopping)
}

fn flush(store: &Store, batch: Vec<Waiter>, progress: &mut Progress) {
    let started = Instant::now();
    let result = store.persist();
    let elapsed = started.elapsed();

    let entries: usize = batch.iter().map(|waiter| waiter.entries).sum();
    crate::metrics::record_fsync(entries, elapsed);

    match result {
        Ok(()) => {
            progress.advance(&batch);
            for waiter in batch {
                (waiter.callback)(Ok(()));
            }
        }
        Err(err) => {
            // The store fails every later persist too (see Store::persist),
            // so this and every later waiter fails, and the Raft groups stop.
            error!(error = %err, waiters = batch.len(), "fsync failed; no further appends will be acknowledged");
            for waiter in batch {
                (waiter.callback)(Err(io::Error::other(err.to_string())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_claims_no_more_than_is_committed() {
        let committed = Committed::default();
        committed.raise(0, 7);
        committed.raise(0, 5);
        let durable = Watermark::from([(0, 10), (1, 4)]);
        assert_eq!(
            committed.cap(&durable),
            Watermark::from([(0, 7), (1, 0)]),
            "shard 0 is capped at its highest commit, shard 1 has none"
        );
    }
}

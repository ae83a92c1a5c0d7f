//! fsync of the storage engine's journal files without holding its lock.
//!
//! fjall's own `persist(SyncAll)` keeps the journal's writer lock for the
//! whole fsync, so every batch commit (Raft log appends, state machine
//! applies) waits behind the disk, and those commits run on the async
//! runtime's threads. Instead, the group-commit thread asks fjall only to
//! hand its buffered journal bytes to the OS (`PersistMode::Buffer`, a
//! `write` under the lock) and then fsyncs the journal files through its own
//! descriptors. fsync acts on the file, not the descriptor, so this makes
//! the same bytes durable while other threads keep committing.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tracing::debug;

/// Name of fjall's journal folder inside the data directory (fjall 2.x).
const JOURNALS: &str = "journals";

/// Open descriptors of the journal files, kept across fsyncs.
pub struct JournalFiles {
    folder: PathBuf,
    open: HashMap<PathBuf, File>,
}

impl JournalFiles {
    pub fn new(data_dir: &Path) -> JournalFiles {
        JournalFiles {
            folder: data_dir.join(JOURNALS),
            open: HashMap::new(),
        }
    }

    /// fsyncs every journal file, and the folder when a file is new to us.
    ///
    /// A journal that disappears was retired by the engine after its
    /// contents were flushed to (synced) segment files, so it is skipped.
    pub fn sync_all(&mut self) -> io::Result<()> {
        let mut present = Vec::new();
        let mut new_file = false;
        for entry in std::fs::read_dir(&self.folder)? {
            let path = entry?.path();
            if !self.open.contains_key(&path) {
                match File::open(&path) {
                    Ok(file) => {
                        debug!(path = %path.display(), "tracking journal file");
                        self.open.insert(path.clone(), file);
                        new_file = true;
                    }
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                }
            }
            present.push(path);
        }
        self.open.retain(|path, _| present.contains(path));

        for file in self.open.values() {
            file.sync_data()?;
        }
        if new_file {
            File::open(&self.folder)?.sync_all()?;
        }
        Ok(())
    }
}

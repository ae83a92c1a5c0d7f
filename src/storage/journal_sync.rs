//! fsync of the storage engine's journal files without holding its lock.
//!
//! fjall's own `persist(SyncAll)` keeps the journal's writer lock for the
//! whole fsync, so every batch commit (Raft log appends, state machine
//! applies) waits behind the disk, and those commits run on the async
//! runtime's threads. Instead, [`crate::storage::Store::persist`] has fjall
//! only hand its buffered journal bytes to the OS (`PersistMode::Buffer`, a
//! `write` under the lock) and then fsyncs the journal files through these
//! descriptors. fsync acts on the file, not the descriptor, so this makes
//! the same bytes durable while other threads keep committing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tracing::debug;

/// Name of fjall's journal folder inside the data directory (fjall 2.x).
const JOURNALS: &str = "journals";

/// A journal file and whether it has been synced since it stopped being
/// the newest one (after which the engine never writes to it again).
struct Journal {
    file: File,
    sealed_and_synced: bool,
}

/// Open descriptors of the journal files, by journal number, kept across fsyncs.
pub struct JournalFiles {
    folder: PathBuf,
    open: BTreeMap<u64, Journal>,
}

impl JournalFiles {
    pub fn new(data_dir: &Path) -> JournalFiles {
        JournalFiles {
            folder: data_dir.join(JOURNALS),
            open: BTreeMap::new(),
        }
    }

    /// fsyncs the journal files that may hold unsynced writes: the newest
    /// (fjall writes only to the highest-numbered journal) and any older one
    /// not synced since a newer one appeared. The folder is fsynced too when
    /// a file is new to us, so its directory entry is durable.
    ///
    /// A journal that disappears was retired by the engine after its
    /// contents were flushed to (synced) segment files, so it is dropped.
    pub fn sync_all(&mut self) -> io::Result<()> {
        let present = self.list()?;
        self.open.retain(|number, _| present.contains_key(number));

        let mut new_file = false;
        for (number, path) in &present {
            if self.open.contains_key(number) {
                continue;
            }
            match File::open(path) {
                Ok(file) => {
                    debug!(path = %path.display(), "tracking journal file");
                    let journal = Journal {
                        file,
                        sealed_and_synced: false,
                    };
                    self.open.insert(*number, journal);
                    new_file = true;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            }
        }

        let newest = self.open.keys().next_back().copied();
        for (number, journal) in self.open.iter_mut() {
            if Some(*number) == newest {
                journal.file.sync_data()?;
            } else if !journal.sealed_and_synced {
                journal.file.sync_data()?;
                journal.sealed_and_synced = true;
            }
        }
        if new_file {
            File::open(&self.folder)?.sync_all()?;
        }
        Ok(())
    }

    /// Lists the journal files by number; other names are ignored.
    fn list(&self) -> io::Result<BTreeMap<u64, PathBuf>> {
        let mut present = BTreeMap::new();
        for entry in std::fs::read_dir(&self.folder)? {
            let entry = entry?;
            let number = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok());
            if let Some(number) = number {
                present.insert(number, entry.path());
            }
        }
        Ok(present)
    }
}

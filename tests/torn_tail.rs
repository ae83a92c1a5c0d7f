//! A torn last record in the storage journal (a crash mid-write) must not
//! stop the server from starting, and damage in the middle of the journal
//! must be reported rather than silently shortening the log.
//!
//! The tests damage the newest file in `<data-dir>/journals/`. Journal
//! files are preallocated and zero-padded, so "the end" below is the end of
//! the written data, found as the last record trailer.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const EVENTS: u64 = 100;

/// Trailer that ends each batch in a fjall 2.x journal (`FJL` and format
/// version 2), written after the batch checksum.
const BATCH_TRAILER: &[u8] = b"FJL\x02";

/// Ways to damage the end of the newest journal file.
#[derive(Clone, Copy, Debug)]
enum Damage {
    DropLastByte,
    DropHalfLastRecord,
    AppendGarbage,
    CutLengthPrefix,
}

/// Creates a session with `EVENTS` events and stops the server cleanly.
async fn prepare_data_dir() -> (tempfile::TempDir, Vec<Ack>) {
    let data_dir = tempfile::tempdir().expect("temporary directory");
    let mut server = Server::start_with(data_dir.path(), &[]);
    create_ok(&server, "ses-torn").await;
    let acks = append_ticks(&server, "ses-torn", 1, EVENTS, 1).await;

    let status = tokio::task::block_in_place(|| server.sigterm());
    assert!(status.success(), "clean stop before damage: {status}");
    (data_dir, acks)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create copy directory");
    for entry in fs::read_dir(from).expect("read data directory") {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy data file");
        }
    }
}

/// Newest journal file: the largest numeric name in `<dir>/journals/`,
/// or else the most recently modified file in any `journals` folder.
fn newest_journal(data_dir: &Path) -> PathBuf {
    let folder = data_dir.join("journals");
    if let Ok(entries) = fs::read_dir(&folder) {
        let numbered = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let number: u64 = entry.file_name().to_str()?.parse().ok()?;
                Some((number, entry.path()))
            })
            .max_by_key(|(number, _)| *number);
        if let Some((_, path)) = numbered {
            return path;
        }
    }

    let mut candidates = Vec::new();
    collect_journal_files(data_dir, &mut candidates);
    candidates
        .into_iter()
        .max_by_key(|path| fs::metadata(path).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no journal file under {}", data_dir.display()))
}

fn collect_journal_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            collect_journal_files(&path, found);
        } else if dir.file_name().is_some_and(|name| name == "journals") {
            found.push(path);
        }
    }
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| *window == needle)
        .map(|(offset, _)| offset)
        .collect()
}

/// Byte ranges of the written data: (start of the last record, end of data).
fn last_record(bytes: &[u8]) -> (usize, usize) {
    let trailers = find_all(bytes, BATCH_TRAILER);
    if let Some(&last) = trailers.last() {
        let end = last + BATCH_TRAILER.len();
        let start = trailers
            .len()
            .checked_sub(2)
            .map(|index| trailers[index] + BATCH_TRAILER.len())
            .unwrap_or(0);
        return (start, end);
    }

    // Unknown format: treat the last 64 written bytes as the last record.
    let end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map(|p| p + 1)
        .unwrap_or(0);
    (end.saturating_sub(64), end)
}

fn damage_journal(path: &Path, damage: Damage) {
    let mut bytes = fs::read(path).expect("read journal");
    let (start, end) = last_record(&bytes);
    assert!(
        end > start,
        "journal {} has no written record",
        path.display()
    );

    match damage {
        Damage::DropLastByte => bytes.truncate(end - 1),
        Damage::DropHalfLastRecord => bytes.truncate(start + (end - start) / 2),
        Damage::AppendGarbage => {
            bytes.truncate(end);
            bytes.extend((0..37u8).map(|i| i.wrapping_mul(97).wrapping_add(13)));
        }
        // A record starts with a one-byte tag and a four-byte item count.
        Damage::CutLengthPrefix => bytes.truncate(start + 3),
    }
    fs::write(path, bytes).expect("write damaged journal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_recovers() {
    let (original, acks) = prepare_data_dir().await;

    for damage in [
        Damage::DropLastByte,
        Damage::DropHalfLastRecord,
        Damage::AppendGarbage,
        Damage::CutLengthPrefix,
    ] {
        let copy = tempfile::tempdir().expect("temporary directory");
        copy_dir(original.path(), copy.path());
        damage_journal(&newest_journal(copy.path()), damage);

        let server = tokio::task::block_in_place(|| Server::try_start_with(copy.path(), &[]))
            .unwrap_or_else(|failure| {
                panic!("{damage:?}: server did not start on a torn tail: {failure:?}")
            });

        let last = last_seq(&server, "ses-torn").await;
        assert!(
            last == EVENTS || last == EVENTS - 1,
            "{damage:?}: last_seq {last}, expected {} or {EVENTS}",
            EVENTS - 1
        );
        let frames = tail_collect(&server, "ses-torn", 0, last, Duration::from_secs(30)).await;
        assert_gapless(&frames, 1, last, &format!("{damage:?}"));
        let kept: Vec<Ack> = acks.iter().filter(|ack| ack.seq <= last).cloned().collect();
        assert_frames_match_acks(&frames, &kept, &format!("{damage:?}"));

        let next = append_ok(&server, "ses-torn", tick(EVENTS + 1)).await;
        assert_eq!(next, last + 1, "{damage:?}: next append after recovery");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middle_damage_not_silent() {
    let (original, acks) = prepare_data_dir().await;
    let copy = tempfile::tempdir().expect("temporary directory");
    copy_dir(original.path(), copy.path());

    let journal = newest_journal(copy.path());
    let mut bytes = fs::read(&journal).expect("read journal");
    let trailers = find_all(&bytes, BATCH_TRAILER);
    assert!(
        trailers.len() >= 4,
        "journal {} has {} batch trailers; the test needs a journal with several records",
        journal.display(),
        trailers.len()
    );
    // Flip bytes in the middle of a record halfway through the journal, so
    // valid records follow the damaged one.
    let index = trailers.len() / 2;
    let record_start = trailers[index - 1] + BATCH_TRAILER.len();
    let target = record_start + (trailers[index] - record_start) / 2;
    for byte in &mut bytes[target..target + 4] {
        *byte ^= 0xA5;
    }
    fs::write(&journal, bytes).expect("write damaged journal");

    assert_refused_or_intact(copy.path(), &acks, "after middle damage").await;
}

/// Starting on a damaged copy must either fail with an explanation of
/// corruption or serve every acknowledged event unchanged.
async fn assert_refused_or_intact(data_dir: &Path, acks: &[Ack], context: &str) {
    match tokio::task::block_in_place(|| Server::try_start_with(data_dir, &[])) {
        Err(failure) => {
            let status = failure.status;
            assert!(
                status.is_some_and(|status| !status.success()),
                "{context}: server must exit non-zero on a corrupt journal, got {status:?}; output:\n{}",
                failure.logs
            );
            assert!(
                failure.logs.to_lowercase().contains("corrupt"),
                "{context}: the exit must be explained by a log line about corruption; output:\n{}",
                failure.logs
            );
        }
        Ok(server) => {
            let last = last_seq(&server, "ses-torn").await;
            assert_eq!(
                last, EVENTS,
                "{context}: a server that starts on damage must keep every acked event"
            );
            let frames = tail_collect(&server, "ses-torn", 0, last, Duration::from_secs(30)).await;
            assert_gapless(&frames, 1, EVENTS, context);
            assert_frames_match_acks(&frames, acks, context);
        }
    }
}

/// Damage to the header of a record in the middle (its marker, length or
/// sequence fields) can make the storage engine's recovery stop reading
/// there without an error. The server must still not serve the shortened
/// log: each variant is refused or served whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middle_header_damage_not_silent() {
    let (original, acks) = prepare_data_dir().await;
    let journal_name = newest_journal(original.path())
        .strip_prefix(original.path())
        .expect("journal is inside the data directory")
        .to_path_buf();
    let bytes = fs::read(original.path().join(&journal_name)).expect("read journal");
    let trailers = find_all(&bytes, BATCH_TRAILER);
    assert!(
        trailers.len() >= 4,
        "the test needs a journal with several records"
    );
    let record_start = trailers[trailers.len() / 2 - 1] + BATCH_TRAILER.len();

    for offset in 0..16 {
        let copy = tempfile::tempdir().expect("temporary directory");
        copy_dir(original.path(), copy.path());
        let path = copy.path().join(&journal_name);
        let mut damaged = bytes.clone();
        damaged[record_start + offset] ^= 0xFF;
        fs::write(&path, damaged).expect("write damaged journal");

        let context = format!("byte {offset} of a middle record flipped");
        assert_refused_or_intact(copy.path(), &acks, &context).await;
    }
}

//! Trim requests: the archived seqs the archiver sends through each shard's
//! Raft log, after which every replica deletes the archived events older
//! than the newest `tail_keep` of each session.

use std::collections::{BTreeMap, HashMap};

use tracing::{debug, info, warn};

use crate::cluster::Router;
use crate::consensus::state_machine::{read_header, read_mark};
use crate::consensus::{ArchivedCommand, Command, Outcome};
use crate::session::retention::ArchiveMark;
use crate::storage::Store;

/// Sessions in one trim command at most.
const SESSIONS_PER_COMMAND: usize = 1024;

/// Approximate maximum of event deletions per trim command. Every replica
/// applies a command's deletions in one atomic write, so a long archived
/// history (say, one archived by an earlier version that did not trim) is
/// trimmed in many modest entries rather than one that could exhaust
/// memory. A session can exceed its share when its archived seq was
/// recorded ahead of its trimmed seq, by at most the keep count in force
/// when that was recorded.
const EVENTS_PER_COMMAND: u64 = 50_000;

/// Trim commands sent in one flush at most, so trimming a long backlog does
/// not hold up archiving; the rest goes in later flushes.
const COMMANDS_PER_FLUSH: usize = 16;

/// Sessions whose archived events may be trimmed, with the archived seq the
/// archive has for each. A session stays queued until its local mark has
/// reached what that seq allows, whatever number of commands it takes.
#[derive(Default)]
pub struct TrimQueue {
    due: HashMap<String, u64>,
    /// Shard whose trims go first in the next flush. It moves on every
    /// flush, so a long backlog of one shard cannot hold up the others.
    first_shard: u32,
}

/// The trim one queued session still needs.
struct Planned {
    session_id: String,
    /// Archived seq the archive has.
    archived: u64,
    /// Trimmed seq of the local mark now.
    trimmed: u64,
    /// Trimmed seq the archived seq allows.
    target: u64,
}

/// One session's share of a trim command.
struct Step {
    session_id: String,
    /// Archived seq sent in the command; below the archive's real one when
    /// the command has room for only part of the session's trim.
    archived: u64,
    /// Whether this step completes the session's queued trim.
    last: bool,
}

impl TrimQueue {
    /// Queues the trim that an archived seq allows, if any. A trim deletes
    /// something only once archived events lie more than `tail_keep` behind
    /// the session's last seq, so shorter sessions add no log entries.
    /// `mark` is the session's mark as the caller read it; one that moved
    /// on since only makes the queued trim a no-op, which [`Self::plan`]
    /// drops.
    pub fn schedule(
        &mut self,
        session_id: &str,
        mark: ArchiveMark,
        archived: u64,
        last_seq: u64,
        tail_keep: u64,
    ) {
        if mark.advance(archived, last_seq, tail_keep).trimmed_through > mark.trimmed_through {
            let due = self.due.entry(session_id.to_string()).or_default();
            *due = (*due).max(archived);
        }
    }

    /// Sends the queued trims through each shard's log, in commands of
    /// bounded size. A failed send stays queued for the next flush.
    pub async fn send(&mut self, store: &Store, router: &Router, tail_keep: u64) {
        if self.due.is_empty() {
            return;
        }
        let mut plan = self.plan(store, router, tail_keep);
        let later = plan.split_off(&self.first_shard);
        self.first_shard = self.first_shard.wrapping_add(1) % router.topology().shards().max(1);

        let mut sent = 0;
        for (shard, steps) in later.into_iter().chain(plan) {
            for command in split(steps) {
                if sent == COMMANDS_PER_FLUSH {
                    info!(
                        queued = self.due.len(),
                        "trim backlog continues in the next flush"
                    );
                    return;
                }
                sent += 1;
                if !self.send_one(shard, command, router, tail_keep).await {
                    // The shard has no leader or quorum now, and each
                    // further attempt would wait as long again.
                    break;
                }
            }
        }
    }

    /// Groups the queued sessions by shard with the deletions each still
    /// needs, and drops the sessions whose trim is already done (by this
    /// node's earlier command, or another node's).
    fn plan(
        &mut self,
        store: &Store,
        router: &Router,
        tail_keep: u64,
    ) -> BTreeMap<u32, Vec<Planned>> {
        let mut by_shard: BTreeMap<u32, Vec<Planned>> = BTreeMap::new();
        let mut done = Vec::new();
        for (session_id, archived) in &self.due {
            // A read that fails (the codec logs it) drops the session, which
            // is considered again the next time it is archived.
            let (Ok(Some(header)), Ok(mark)) =
                (read_header(store, session_id), read_mark(store, session_id))
            else {
                done.push(session_id.clone());
                continue;
            };
            let mark = mark.unwrap_or_default();
            let target = mark
                .advance(*archived, header.last_seq, tail_keep)
                .trimmed_through;
            if target <= mark.trimmed_through {
                done.push(session_id.clone());
                continue;
            }
            by_shard
                .entry(router.shard_of(session_id))
                .or_default()
                .push(Planned {
                    session_id: session_id.clone(),
                    archived: *archived,
                    trimmed: mark.trimmed_through,
                    target,
                });
        }
        for session_id in done {
            self.due.remove(&session_id);
        }
        by_shard
    }

    /// Sends one command and returns whether the shard's log took it.
    async fn send_one(
        &mut self,
        shard: u32,
        steps: Vec<Step>,
        router: &Router,
        tail_keep: u64,
    ) -> bool {
        let sessions: Vec<(String, u64)> = steps
            .iter()
            .map(|step| (step.session_id.clone(), step.archived))
            .collect();
        let count = sessions.len();
        let command = Command::Archived(ArchivedCommand {
            sessions,
            tail_keep,
        });
        match router.write(command, &steps[0].session_id).await {
            Ok(Outcome::Archived { trimmed }) => {
                debug!(shard, sessions = count, trimmed, "archived events trimmed");
                // A partial step leaves its session queued; the next plan
                // starts from the mark this command moved.
                for step in steps.iter().filter(|step| step.last) {
                    if self.due.get(&step.session_id) == Some(&step.archived) {
                        self.due.remove(&step.session_id);
                    }
                }
                true
            }
            Ok(other) => {
                warn!(shard, outcome = ?other, "trim command got an unexpected outcome; retrying next flush");
                false
            }
            Err(err) => {
                warn!(shard, sessions = count, error = %err, "sending a trim through the shard's log failed; retrying next flush");
                false
            }
        }
    }
}

/// Splits one shard's planned trims into commands of at most
/// [`SESSIONS_PER_COMMAND`] sessions and about [`EVENTS_PER_COMMAND`]
/// deletions.
fn split(planned: Vec<Planned>) -> Vec<Vec<Step>> {
    let mut commands = Vec::new();
    let mut current = Vec::new();
    let mut budget = EVENTS_PER_COMMAND;
    for session in planned {
        let mut from = session.trimmed;
        while from < session.target {
            let step = (session.target - from).min(budget);
            let last = from + step == session.target;
            current.push(Step {
                session_id: session.session_id.clone(),
                archived: if last { session.archived } else { from + step },
                last,
            });
            from += step;
            budget -= step;
            if budget == 0 || current.len() == SESSIONS_PER_COMMAND {
                commands.push(std::mem::take(&mut current));
                budget = EVENTS_PER_COMMAND;
            }
        }
    }
    if !current.is_empty() {
        commands.push(current);
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(session_id: &str, archived: u64, trimmed: u64, target: u64) -> Planned {
        Planned {
            session_id: session_id.to_string(),
            archived,
            trimmed,
            target,
        }
    }

    fn steps(commands: &[Vec<Step>]) -> Vec<Vec<(&str, u64, bool)>> {
        commands
            .iter()
            .map(|command| {
                command
                    .iter()
                    .map(|s| (s.session_id.as_str(), s.archived, s.last))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn small_trims_share_one_command() {
        let commands = split(vec![planned("a", 500, 0, 400), planned("b", 90, 10, 80)]);
        assert_eq!(
            steps(&commands),
            vec![vec![("a", 500, true), ("b", 90, true)]]
        );
    }

    #[test]
    fn large_trim_is_cut_into_commands() {
        let commands = split(vec![planned("a", 120_000, 0, 119_000)]);
        assert_eq!(
            steps(&commands),
            vec![
                vec![("a", 50_000, false)],
                vec![("a", 100_000, false)],
                vec![("a", 120_000, true)],
            ],
            "each command carries an archived seq that allows at most its budget"
        );
    }

    #[test]
    fn budget_carries_over_between_sessions() {
        let commands = split(vec![
            planned("a", 40_000, 0, 40_000),
            planned("b", 30_000, 0, 30_000),
        ]);
        assert_eq!(
            steps(&commands),
            vec![
                vec![("a", 40_000, true), ("b", 10_000, false)],
                vec![("b", 30_000, true)],
            ]
        );
    }
}

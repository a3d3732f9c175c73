//! The audit trail: every management action, appended to `audit.log` in the store's
//! directory as one JSON line, each line chained to the one before by SHA-256, so an edit,
//! a deletion or a reordering of any entry breaks the chain from there on and [`verify`]
//! names the first broken entry.
//!
//! An entry's `hash` is the SHA-256 (hex) of the previous entry's `hash` (64 zeros for the
//! first), a newline, and the entry's JSON without its `hash` field (fields in declaration
//! order). Each append is written and fsynced before it returns.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::StoreError;

/// The hash before the first entry.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as the caller tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// Who: the admin token's id, or the gateway itself (`rollout`, `sighup`, `watcher`).
    pub actor: String,
    /// What: `upload`, `rollback`, `delete`, `reload`, `rollout_decision`, `rollout_command`.
    pub action: String,
    /// On what: `plugin/hygiene`, `model/recs`, `experiment/search-ranking`, the config file.
    pub target: String,
    /// How it ended: `ok`, `refused: ...`, or the decision.
    pub outcome: String,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub action: Action,
    /// The chain: see the module documentation.
    pub hash: String,
}

#[derive(Serialize)]
struct Unhashed<'a> {
    seq: u64,
    at_ms: u64,
    #[serde(flatten)]
    action: &'a Action,
}

fn chain_hash(prev: &str, seq: u64, at_ms: u64, action: &Action) -> String {
    let body = serde_json::to_vec(&Unhashed { seq, at_ms, action }).expect("entries serialize");
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(&body);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the chain first breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: audit entry {seq}: {problem}")]
pub struct Broken {
    /// The log file.
    pub file: String,
    /// Its line, from 1.
    pub line: usize,
    /// The entry's `seq` as written (0 when the line is not an entry).
    pub seq: u64,
    /// What is wrong.
    pub problem: String,
}

/// An audit log. Appends from several processes (an old and a new one during an upgrade,
/// nodes sharing a store directory) keep one chain: each append holds an exclusive lock on
/// the file and chains to the last entry in the file, not to one it remembers.
pub struct AuditLog {
    path: PathBuf,
    /// Serialises this process's appends before they take the file lock.
    appending: Mutex<()>,
}

/// Most bytes of the file's end read to find its last entry; entries are far smaller.
const TAIL: u64 = 64 * 1024;

impl AuditLog {
    /// The log in `dir` (`audit.log`), created on first append. An existing log is verified
    /// first: appending to a broken chain would hide where it broke.
    pub fn open(dir: &Path) -> Result<AuditLog, AuditError> {
        let path = dir.join("audit.log");
        match std::fs::File::open(&path) {
            Ok(_) => {
                verify(&path)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(AuditError::Store(StoreError::Io { path, source }));
            }
        }
        Ok(AuditLog {
            path,
            appending: Mutex::new(()),
        })
    }

    /// Appends an entry at `at_ms` and makes it durable; returns it.
    pub fn append(&self, at_ms: u64, action: Action) -> Result<Entry, AuditError> {
        use std::io::{Read, Seek, SeekFrom};
        let _one = self.appending.lock().expect("audit lock");
        let io = |source| {
            AuditError::Store(StoreError::Io {
                path: self.path.clone(),
                source,
            })
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        // Released when `f` closes.
        f.lock().map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let mut tail = Vec::new();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL)))
            .map_err(io)?;
        f.read_to_end(&mut tail).map_err(io)?;
        let last = match tail
            .strip_suffix(b"\n")
            .unwrap_or(&tail)
            .rsplit(|b| *b == b'\n')
            .next()
        {
            Some(line) if !line.is_empty() => {
                let e: Entry = serde_json::from_slice(line).map_err(|e| {
                    AuditError::Broken(Broken {
                        file: self.path.display().to_string(),
                        line: 0,
                        seq: 0,
                        problem: format!("the last entry cannot be read: {e}"),
                    })
                })?;
                (e.seq, e.hash)
            }
            _ => (0, GENESIS.to_string()),
        };
        let seq = last.0 + 1;
        let hash = chain_hash(&last.1, seq, at_ms, &action);
        let entry = Entry {
            seq,
            at_ms,
            action,
            hash,
        };
        let mut line = serde_json::to_vec(&entry).expect("entries serialize");
        line.push(b'\n');
        f.write_all(&line).map_err(io)?;
        f.sync_data().map_err(io)?;
        Ok(entry)
    }

    /// Every entry, oldest first (the chain verified).
    pub fn entries(&self) -> Result<Vec<Entry>, AuditError> {
        match std::fs::File::open(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            _ => Ok(verify(&self.path)?),
        }
    }
}

/// Why the audit log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The chain is broken.
    #[error("the audit log's chain is broken: {0}")]
    Broken(#[from] Broken),
}

/// Reads and checks the log at `path`; every entry, or the first broken one.
pub fn verify(path: &Path) -> Result<Vec<Entry>, AuditError> {
    let file = std::fs::File::open(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let shown = path.display().to_string();
    let mut prev = GENESIS.to_string();
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let broken = |seq, problem: String| Broken {
            file: shown.clone(),
            line: i + 1,
            seq,
            problem,
        };
        let entry: Entry = serde_json::from_str(&line)
            .map_err(|e| broken(0, format!("not an audit entry ({e})")))?;
        let expected_seq = out.len() as u64 + 1;
        if entry.seq != expected_seq {
            return Err(broken(
                entry.seq,
                format!("out of sequence: expected entry {expected_seq} (an entry was removed or moved)"),
            )
            .into());
        }
        let hash = chain_hash(&prev, entry.seq, entry.at_ms, &entry.action);
        if hash != entry.hash {
            return Err(broken(
                entry.seq,
                "its hash does not match its content and the entry before it (it was edited)"
                    .into(),
            )
            .into());
        }
        prev = entry.hash.clone();
        out.push(entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(i: usize) -> Action {
        Action {
            actor: "a1b2c3d4".into(),
            action: "upload".into(),
            target: format!("plugin/p{i}"),
            outcome: "ok".into(),
        }
    }

    fn scratch() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gw-audit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn two_writers_on_one_file_keep_one_chain() {
        // An old and a new process during an upgrade, or two nodes sharing a store: each
        // opened the log before the other appended.
        let dir = scratch();
        let a = std::sync::Arc::new(AuditLog::open(&dir).unwrap());
        let b = std::sync::Arc::new(AuditLog::open(&dir).unwrap());
        let writers: Vec<_> = [a, b]
            .into_iter()
            .map(|log| {
                std::thread::spawn(move || {
                    for i in 0..25 {
                        log.append(i, action(i as usize)).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let entries = verify(&dir.join("audit.log")).unwrap();
        assert_eq!(entries.len(), 50);
        assert_eq!(entries.last().unwrap().seq, 50);
    }

    #[test]
    fn appends_chain_and_survive_reopening() {
        let dir = scratch();
        let log = AuditLog::open(&dir).unwrap();
        assert!(log.entries().unwrap().is_empty());
        for i in 0..3 {
            log.append(1000 + i as u64, action(i)).unwrap();
        }
        drop(log);
        let log = AuditLog::open(&dir).unwrap();
        let e = log.append(2000, action(9)).unwrap();
        assert_eq!(e.seq, 4);
        let all = log.entries().unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[3].action.target, "plugin/p9");
    }

    #[test]
    fn an_edited_removed_or_moved_entry_is_named() {
        let dir = scratch();
        let log = AuditLog::open(&dir).unwrap();
        for i in 0..4 {
            log.append(1000 + i as u64, action(i)).unwrap();
        }
        let path = dir.join("audit.log");
        let original = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = original.lines().collect();

        let edited = original.replacen("plugin/p2", "plugin/pX", 1);
        std::fs::write(&path, edited).unwrap();
        let err = verify(&path).unwrap_err().to_string();
        assert!(
            err.contains(":3: audit entry 3:") && err.contains("edited"),
            "{err}"
        );

        let removed = [lines[0], lines[2], lines[3]].join("\n") + "\n";
        std::fs::write(&path, removed).unwrap();
        let err = verify(&path).unwrap_err().to_string();
        assert!(
            err.contains(":2: audit entry 3:") && err.contains("out of sequence"),
            "{err}"
        );

        // Reopening a broken log refuses to append to it.
        assert!(AuditLog::open(&dir).is_err());
        std::fs::write(&path, &original).unwrap();
        assert_eq!(verify(&path).unwrap().len(), 4);
    }
}

//! Files that survive a crash or a power cut: fsync of files and directories, renames whose new
//! name is made durable, atomic replacement of a small file, and recognising what a crashed
//! process left behind.
//!
//! A rename is durable only once the directory that holds the new name is synced, and a file's
//! contents only once the file is; both are done here for every checkpoint and pointer file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{ModelError, Result};

/// Flushes a file's contents and metadata to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    note_synced(path);
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(path, e))
}

/// Flushes a directory's entries (names created, renamed or removed in it) to the disk. A no-op
/// where directories cannot be opened for syncing (Windows).
pub fn sync_dir(path: &Path) -> Result<()> {
    note_synced(path);
    if cfg!(unix) {
        fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| ModelError::io(path, e))?;
    }
    Ok(())
}

/// Syncs every file below `dir`, every directory below it, then `dir` itself.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let path = entry.map_err(|e| ModelError::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Renames `from` to `to`, then syncs the directory that holds `to` (and the one that held
/// `from`, when it is another), so that the rename survives a crash.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| ModelError::io(to, e))?;
    let (old_parent, new_parent) = (parent_dir(from), parent_dir(to));
    sync_dir(&new_parent)?;
    if old_parent != new_parent {
        sync_dir(&old_parent)?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically and durably: writes and syncs a temporary sibling
/// (`NAME.tmp-PID`), renames it over `path` and syncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| ModelError::io(&tmp, e))?;
    note_synced(&tmp);
    rename(&tmp, path)
}

/// A suffix no other writer uses: this process's id and a per-process counter (`PID-N`). The pid
/// lets a later process tell whether the writer is still alive.
pub fn unique_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a process with this id runs on this machine. Errs on the side of "alive" (the caller
/// then leaves its files alone): where it cannot tell (not unix, an id that no process can have).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        if pid <= 0 {
            return true;
        }
        // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Records a sync, so that tests can check what was made durable.
#[cfg(test)]
fn note_synced(path: &Path) {
    tests::SYNCED.with(|s| s.borrow_mut().push(path.to_path_buf()));
}

#[cfg(not(test))]
fn note_synced(_: &Path) {}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;

    use super::*;

    thread_local! {
        /// Paths synced by this thread, in order.
        pub(crate) static SYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    /// Takes the paths this thread synced so far.
    pub(crate) fn take_synced() -> Vec<PathBuf> {
        SYNCED.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }

    #[test]
    fn write_atomic_syncs_the_file_and_then_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("latest");
        take_synced();
        write_atomic(&target, b"checkpoints/step-1").unwrap();
        write_atomic(&target, b"checkpoints/step-2").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "checkpoints/step-2");
        let synced = take_synced();
        let tmp_file = target.with_extension(format!("tmp-{}", std::process::id()));
        let one = vec![tmp_file, tmp.path().to_path_buf()];
        assert_eq!(synced, [one.clone(), one].concat());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "no temp file");
    }

    #[test]
    fn rename_syncs_both_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(a.join("f"), "x").unwrap();
        take_synced();
        rename(&a.join("f"), &b.join("f")).unwrap();
        assert_eq!(take_synced(), [b.clone(), a.clone()]);
        rename(&b.join("f"), &b.join("g")).unwrap();
        assert_eq!(take_synced(), [b]);
    }

    #[test]
    fn suffixes_are_unique_and_name_this_process() {
        let (a, b) = (unique_suffix(), unique_suffix());
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("{}-", std::process::id())));
    }

    #[cfg(unix)]
    #[test]
    fn a_finished_process_is_not_alive_and_this_one_is() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(finished_pid()));
    }

    /// The id of a process that has exited (and been reaped).
    #[cfg(unix)]
    pub(crate) fn finished_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }
}

//! Outputs built beside their destination and renamed into place, so a failure (or a kill)
//! never leaves a half-written file or folder at the destination.
//!
//! A temporary is named `.NAME.tmpPID.N` (NAME the destination's file name, PID the writing
//! process, N a per-process counter) in the destination's folder. Only a process killed
//! without a chance to clean up leaves one behind; [`leftovers`] recognises them by that name
//! and [`remove_leftovers`] deletes them. Live temporaries are registered so that a signal
//! handler can delete them ([`remove_live_temporaries`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Temporaries of this process not yet committed or removed.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// What a destination is to receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A regular file (replaced if it exists).
    File,
    /// A folder (created; an existing one must be empty).
    Folder,
}

/// The folder a destination lives in (`.` for a bare name).
pub(crate) fn parent_dir(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn dest_name(dest: &Path) -> String {
    dest.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string())
}

/// A fresh temporary path beside `dest`, registered as live until [`forget`] is called.
pub(crate) fn temp_path(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = parent_dir(dest).join(format!(
        ".{}.tmp{}.{unique}",
        dest_name(dest),
        std::process::id()
    ));
    if let Ok(mut live) = LIVE.lock() {
        live.push(tmp.clone());
    }
    tmp
}

/// Unregisters a temporary (committed or removed).
pub(crate) fn forget(tmp: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|p| p != tmp);
    }
}

/// Deletes every temporary this process has not committed yet. Meant for a signal handler
/// (SIGINT, SIGTERM) that is about to exit the process.
pub fn remove_live_temporaries() {
    let paths = match LIVE.lock() {
        Ok(mut live) => std::mem::take(&mut *live),
        Err(_) => return,
    };
    for p in paths {
        remove_path(&p);
    }
}

fn remove_path(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// The PID in a temporary's name, if `name` is a temporary of `dest_name`.
fn temp_pid(name: &str, dest_name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_prefix(dest_name)?;
    let rest = rest.strip_prefix(".tmp")?;
    let (pid, counter) = rest.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(counter))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Whether a process with this PID may be running: known on Linux (`/proc`), assumed
/// elsewhere, so that a temporary of a merge running right now is never taken for a
/// leftover (there, leftovers are neither reported nor removed).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Temporaries of `dest` left by a process that is no longer running (a killed merge or
/// save), by their name. Empty when the folder cannot be read, and on systems other than
/// Linux, where whether their writer still runs cannot be told.
pub fn leftovers(dest: &Path) -> Vec<PathBuf> {
    let name = dest_name(dest);
    let Ok(entries) = std::fs::read_dir(parent_dir(dest)) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            temp_pid(&e.file_name().to_string_lossy(), &name).is_some_and(|p| !process_alive(p))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Deletes [`leftovers`] of `dest` and returns what was deleted.
pub fn remove_leftovers(dest: &Path) -> Result<Vec<PathBuf>> {
    let found = leftovers(dest);
    for p in &found {
        let result = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        result.map_err(|e| Error::io(p, e))?;
    }
    Ok(found)
}

/// Checks, before any work, that `dest` can receive an output of `kind`: its folder exists;
/// it is absent, or a regular file (for a file), or an empty folder (for a folder). A
/// device, fifo or socket is refused.
pub fn check_destination(dest: &Path, kind: OutputKind) -> Result<()> {
    let parent = parent_dir(dest);
    if !parent.is_dir() {
        return Err(Error::checkpoint(
            dest,
            format!("its folder {} does not exist", parent.display()),
        ));
    }
    let Ok(meta) = std::fs::metadata(dest) else {
        return Ok(());
    };
    let ft = meta.file_type();
    match kind {
        OutputKind::File if ft.is_file() => Ok(()),
        OutputKind::File if ft.is_dir() => Err(Error::checkpoint(
            dest,
            "is a folder, but the output is a single file",
        )),
        OutputKind::Folder if ft.is_dir() => {
            let empty = std::fs::read_dir(dest)
                .map_err(|e| Error::io(dest, e))?
                .next()
                .is_none();
            if empty {
                Ok(())
            } else {
                Err(Error::checkpoint(
                    dest,
                    "the output folder exists and is not empty",
                ))
            }
        }
        OutputKind::Folder if ft.is_file() => Err(Error::checkpoint(
            dest,
            "is a file, but the output is a folder",
        )),
        _ => Err(Error::checkpoint(
            dest,
            "is not a regular file or folder (a device, fifo or socket); refusing to replace it",
        )),
    }
}

/// A folder built under a temporary name beside its destination. [`StagedDir::commit`]
/// renames it into place; dropping it uncommitted deletes it.
#[derive(Debug)]
pub struct StagedDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Creates the temporary folder for `dest` (checked with [`check_destination`]).
    pub fn create(dest: &Path) -> Result<Self> {
        check_destination(dest, OutputKind::Folder)?;
        let tmp = temp_path(dest);
        let staged = Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        };
        std::fs::create_dir(&staged.tmp).map_err(|e| Error::io(&staged.tmp, e))?;
        Ok(staged)
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs the folder's files and renames it over `dest` (an empty folder there is
    /// replaced).
    pub fn commit(mut self) -> Result<()> {
        check_destination(&self.dest, OutputKind::Folder)?;
        if self.dest.is_dir() {
            std::fs::remove_dir(&self.dest).map_err(|e| Error::io(&self.dest, e))?;
        }
        sync_dir(&self.tmp);
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        forget(&self.tmp);
        sync_dir(&parent_dir(&self.dest));
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
            forget(&self.tmp);
        }
    }
}

/// Makes a folder's entries durable where the platform allows opening a folder.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed and
/// fsynced, then renamed over `path` (readers see the old file or the new one, never half).
///
/// On any failure the previous file at `path` (if any) is left untouched, the temporary file
/// is removed, and the error names the path that failed. Only a crash of the process itself
/// can leave a temporary behind (`.NAME.tmpPID.N` next to `path`); it is never read.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] for content produced by a writer callback: `write` streams the file's
/// bytes into the temporary file; if it (or the flush, fsync or rename) fails, the previous
/// file at `path` is left intact and no temporary file remains.
///
/// Exposed so tests can inject a writer that fails part-way; prefer [`write_atomic`].
#[doc(hidden)]
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    StagedFile::stage(path, write)?.commit()
}

/// Writes several files as one save: every file is written and fsynced under a temporary
/// name first (`write(i, w)` streams file `i`), and only when all are on disk are they
/// renamed over their targets, in order. A failure while writing any of them leaves every
/// previous file intact and no temporary behind. A failure of rename `k` (or a crash between
/// renames) leaves files `0..k` new and the rest previous; the error names file `k`.
///
/// Exposed so tests can inject a writer that fails part-way; [`save_adapter`] uses it.
#[doc(hidden)]
pub fn write_atomic_all_with(
    paths: &[&Path],
    mut write: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let mut staged = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        // On an error, `staged` drops and removes the temporaries written so far.
        staged.push(StagedFile::stage(path, |w| write(i, w))?);
    }
    staged.into_iter().try_for_each(StagedFile::commit)
}

/// A file written and fsynced under a temporary name in its target directory, waiting to be
/// renamed over its target. Dropping it without [`StagedFile::commit_file`] removes the temporary.
#[derive(Debug)]
pub struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Creates the temporary file for `path` (checked with [`check_destination`]): write it
    /// through the returned `File`, then [`StagedFile::commit_file`].
    pub fn create(path: &Path) -> Result<(Self, std::fs::File)> {
        // Never replace a device, fifo or socket (or a folder) with a regular file.
        check_destination(path, OutputKind::File)?;
        let tmp = temp_path(path);
        let file = match std::fs::File::create(&tmp) {
            Ok(f) => f,
            Err(e) => {
                forget(&tmp);
                return Err(Error::io(path, e));
            }
        };
        let staged = Self {
            tmp,
            path: path.to_path_buf(),
            dir: parent_dir(path),
            committed: false,
        };
        Ok((staged, file))
    }

    /// Writes the temporary file next to `path` through `write`, then flushes and fsyncs it.
    pub(crate) fn stage(
        path: &Path,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<Self> {
        let (staged, mut f) = Self::create(path)?;
        // From here on, dropping `staged` removes the temporary.
        let result = (|| {
            write(&mut f)?;
            f.flush()?;
            f.sync_all()
        })();
        drop(f);
        result.map_err(|e| Error::io(path, e))?;
        Ok(staged)
    }

    /// Fsyncs `file` (the one [`StagedFile::create`] returned), then renames the temporary
    /// over the target.
    pub fn commit_file(self, mut file: std::fs::File) -> Result<()> {
        file.flush()
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(&self.path, e))?;
        drop(file);
        self.commit()
    }

    /// Renames the temporary over the target and fsyncs the directory.
    pub(crate) fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.committed = true;
        forget(&self.tmp);
        // Make the rename itself durable where the platform allows opening a directory.
        sync_dir(&self.dir);
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
            forget(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::temp_pid;

    #[test]
    fn temp_names_are_recognised_only_for_their_destination() {
        assert_eq!(
            temp_pid(".merged.safetensors.tmp42.0", "merged.safetensors"),
            Some(42)
        );
        assert_eq!(temp_pid(".out.tmp7.13", "out"), Some(7));
        assert_eq!(temp_pid(".out.tmp7.13", "other"), None);
        assert_eq!(temp_pid(".out.tmpx.1", "out"), None);
        assert_eq!(temp_pid(".out.tmp7.", "out"), None);
        assert_eq!(temp_pid("out.tmp7.1", "out"), None);
    }
}

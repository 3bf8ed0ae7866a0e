//! Replacing the include file atomically, putting the previous bytes back, and sweeping temp files.
//!
//! nginx reads the file whenever anyone reloads it, so it must never see a half-written one:
//! the bytes go to a temp file in the same directory, which is fsynced, given the old file's
//! mode and renamed over it; then the directory is fsynced so the rename survives a crash.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::NginxError;

/// The part of a temp file's name after `.<file>`; what `clean_temp_files` looks for.
const TEMP_INFIX: &str = ".upstreamd-tmp.";

/// The mode of a new include file when there is no old one to copy it from.
const DEFAULT_MODE: u32 = 0o644;

/// Makes temp names unique within this process (the pid makes them unique across processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically, keeping the mode of the existing file (0644 when
/// there is none). A symlink at `path` is followed: its target is replaced, the link kept.
///
/// On failure the old file is untouched and the temp file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), NginxError> {
    let path = &resolve_symlink(path)?;
    let mode = current_mode(path)?.unwrap_or(DEFAULT_MODE);
    let (temp, file) = create_temp(path)?;
    let written = fill_temp(file, &temp, bytes, mode).and_then(|()| rename(&temp, path));
    if written.is_err() {
        // Best effort: the write already failed, and a leftover is swept at the next start.
        let _ = fs::remove_file(&temp);
    }
    written?;
    sync_dir(parent_dir(path))
}

/// The current bytes of `path`; `None` when there is no such file.
pub fn read_current(path: &Path) -> Result<Option<Vec<u8>>, NginxError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NginxError::io("read", path, e)),
    }
}

/// Puts back what `read_current` returned before a change: the old bytes, or no file at all.
pub fn restore(path: &Path, previous: Option<&[u8]>) -> Result<(), NginxError> {
    match previous {
        Some(bytes) => write_atomic(path, bytes),
        None => {
            let path = &resolve_symlink(path)?;
            match fs::remove_file(path) {
                Ok(()) => sync_dir(parent_dir(path)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(NginxError::io("remove", path, e)),
            }
        }
    }
}

/// Removes the `.<file>.upstreamd-tmp.*` files a crashed run may have left next to `path`;
/// returns how many. Call it at startup, before the first write.
pub fn clean_temp_files(path: &Path) -> Result<usize, NginxError> {
    let path = &resolve_symlink(path)?;
    let dir = parent_dir(path);
    let prefix = format!(".{}{TEMP_INFIX}", file_name(path)?);
    let entries = fs::read_dir(dir).map_err(|e| NginxError::io("list", dir, e))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| NginxError::io("list", dir, e))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(&prefix))
        {
            let leftover = entry.path();
            match fs::remove_file(&leftover) {
                Ok(()) => removed += 1,
                // Another upstreamd sweeping the same directory got there first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(NginxError::io("remove", leftover, e)),
            }
        }
    }
    Ok(removed)
}

/// Creates a new `.<file>.upstreamd-tmp.<pid>.<n>` next to `path`. A name already taken can
/// only be a leftover of a dead process that had our pid: it is skipped, not overwritten.
fn create_temp(path: &Path) -> Result<(PathBuf, File), NginxError> {
    let (dir, name) = (parent_dir(path), file_name(path)?);
    let mut attempts = 0;
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{name}{TEMP_INFIX}{}.{n}", std::process::id()));
        match create_new(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 16 => attempts += 1,
            Err(e) => return Err(NginxError::io("create", temp, e)),
        }
    }
}

/// Writes, chmods and fsyncs the new temp file.
fn fill_temp(mut file: File, temp: &Path, bytes: &[u8], mode: u32) -> Result<(), NginxError> {
    write_all(&mut file, temp, bytes)?;
    set_mode(&file, temp, mode)?;
    sync_file(&file, temp)
}

fn resolve_symlink(path: &Path) -> Result<PathBuf, NginxError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(|e| NginxError::io("follow the symlink", path, e))
        }
        Ok(_) => Ok(path.to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path.to_owned()),
        Err(e) => Err(NginxError::io("stat", path, e)),
    }
}

fn current_mode(path: &Path) -> Result<Option<u32>, NginxError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(meta.permissions().mode() & 0o7777)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NginxError::io("stat", path, e)),
    }
}

fn file_name(path: &Path) -> Result<&str, NginxError> {
    path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        let e = io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path has no UTF-8 file name",
        );
        NginxError::io("name a temp file for", path, e)
    })
}

/// The directory of `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        // Owner-only until `set_mode`, so nobody reads a half-written file under a wider mode.
        .mode(0o600)
        .open(path)
}

fn write_all(file: &mut File, path: &Path, bytes: &[u8]) -> Result<(), NginxError> {
    file.write_all(bytes)
        .map_err(|e| NginxError::io("write", path, e))
}

/// `fchmod` rather than the create mode, which the umask would narrow.
fn set_mode(file: &File, path: &Path, mode: u32) -> Result<(), NginxError> {
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|e| NginxError::io("set the mode of", path, e))
}

fn sync_file(file: &File, path: &Path) -> Result<(), NginxError> {
    file.sync_all()
        .map_err(|e| NginxError::io("fsync", path, e))
}

fn rename(from: &Path, to: &Path) -> Result<(), NginxError> {
    fs::rename(from, to).map_err(|e| NginxError::io("rename a temp file onto", to, e))
}

fn sync_dir(dir: &Path) -> Result<(), NginxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| NginxError::io("fsync the directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_atomic_keeps_the_mode_of_the_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.conf");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();

        write_atomic(&path, b"new bytes").unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"new bytes");
        assert_eq!(mode_of(&path), 0o640);
    }

    #[test]
    fn write_atomic_creates_a_missing_file_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.conf");

        write_atomic(&path, b"first").unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(mode_of(&path), 0o644);
    }

    #[test]
    fn write_atomic_leaves_no_temp_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.conf");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();

        assert_eq!(names_in(dir.path()), ["up.conf"]);
    }

    #[test]
    fn write_atomic_into_a_missing_directory_names_the_step_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("up.conf");

        let err = write_atomic(&path, b"x").unwrap_err();

        let text = err.to_string();
        assert!(text.starts_with("failed to create `"), "{text}");
        assert!(text.contains("missing/.up.conf.upstreamd-tmp."), "{text}");
        assert!(text.contains("No such file or directory"), "{text}");
    }

    #[test]
    fn write_atomic_replaces_the_target_of_a_symlink_and_keeps_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.conf");
        let link = dir.path().join("up.conf");
        fs::write(&target, b"old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();

        write_atomic(&link, b"new").unwrap();

        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn read_current_of_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_current(&dir.path().join("nope.conf")).unwrap(), None);
    }

    #[test]
    fn restore_of_some_bytes_puts_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.conf");
        fs::write(&path, b"new").unwrap();

        restore(&path, Some(b"old\0bytes")).unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"old\0bytes");
    }

    #[test]
    fn restore_of_none_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.conf");
        fs::write(&path, b"new").unwrap();

        restore(&path, None).unwrap();

        assert!(!path.exists());
        // And again, with nothing left to remove.
        restore(&path, None).unwrap();
    }

    #[test]
    fn clean_temp_files_removes_only_our_temp_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.conf");
        for name in [
            "up.conf",
            ".up.conf.upstreamd-tmp.123.0",
            ".up.conf.upstreamd-tmp.456.7",
            ".other.conf.upstreamd-tmp.123.0",
            "up.conf.upstreamd-tmp.123.0",
            ".up.conf.swp",
            "site.conf",
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }

        assert_eq!(clean_temp_files(&path).unwrap(), 2);

        assert_eq!(
            names_in(dir.path()),
            [
                ".other.conf.upstreamd-tmp.123.0",
                ".up.conf.swp",
                "site.conf",
                "up.conf",
                "up.conf.upstreamd-tmp.123.0"
            ]
        );
    }
}

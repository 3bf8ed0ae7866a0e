//! Following a log file like `tail -F`, in bounded lines: across rename-and-create rotation
//! and truncation (`copytruncate`), without ever holding more than one line of
//! [`MAX_LINE`](super::parse::MAX_LINE) bytes.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// At most this much is read per [`Tail::poll`], so one poll stays short.
const READ_PER_POLL: usize = 1 << 20;

/// The file being followed, and where in it.
struct Open {
    file: File,
    /// `(device, inode)`: a different pair at the path means the file was rotated.
    id: (u64, u64),
    pos: u64,
}

/// A file followed by path. Each [`Tail::poll`] returns the complete lines written since the
/// last one; a line longer than `max_line` is skipped and counted, never buffered whole.
pub struct Tail {
    path: PathBuf,
    max_line: usize,
    open: Option<Open>,
    /// Whether a file was ever opened: the first one is read from its end (old lines are
    /// history), later ones (after a rotation) from the start.
    opened_once: bool,
    partial: Vec<u8>,
    /// Inside a line already longer than `max_line`: drop bytes up to the next newline.
    skipping: bool,
}

/// What one poll found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Polled {
    /// Complete lines, without their newline.
    pub lines: Vec<Vec<u8>>,
    /// Lines skipped for being longer than `max_line`.
    pub too_long: usize,
    /// The file was found rotated or truncated (and followed to its new start).
    pub reopened: bool,
}

impl Tail {
    /// Follows `path`; nothing is read until the first poll. Lines longer than `max_line`
    /// bytes are skipped.
    pub fn new(path: &Path, max_line: usize) -> Self {
        Self {
            path: path.to_owned(),
            max_line,
            open: None,
            opened_once: false,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// The path followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was appended since the last poll. A missing file is not an error (it may be
    /// between rotation and creation): the poll finds nothing and the next one looks again.
    pub fn poll(&mut self) -> io::Result<Polled> {
        let mut out = Polled::default();
        if self.open.is_none() {
            self.open = self.reopen()?;
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(out);
        };
        if open.file.metadata()?.len() < open.pos {
            // Truncated in place: start over at the new beginning.
            open.file.seek(SeekFrom::Start(0))?;
            open.pos = 0;
            self.partial.clear();
            self.skipping = false;
            out.reopened = true;
        }
        let mut budget = READ_PER_POLL;
        self.read_available(&mut out, &mut budget)?;
        if budget > 0 && self.rotated()? {
            // The old file was read to its end above; whatever is at the path now is new.
            self.open = self.reopen()?;
            self.partial.clear();
            self.skipping = false;
            out.reopened = true;
            self.read_available(&mut out, &mut budget)?;
        }
        Ok(out)
    }

    /// Opens the file at the path, at its end the first time and at its start afterwards.
    fn reopen(&mut self) -> io::Result<Option<Open>> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let pos = if self.opened_once {
            0
        } else {
            file.seek(SeekFrom::End(0))?
        };
        self.opened_once = true;
        Ok(Some(Open {
            file,
            id: (meta.dev(), meta.ino()),
            pos,
        }))
    }

    /// Whether the path now names another file than the one open (or none).
    fn rotated(&self) -> io::Result<bool> {
        let Some(open) = &self.open else {
            return Ok(false);
        };
        match std::fs::metadata(&self.path) {
            Ok(meta) => Ok((meta.dev(), meta.ino()) != open.id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads to the end of the open file (or until `budget` runs out), splitting lines.
    fn read_available(&mut self, out: &mut Polled, budget: &mut usize) -> io::Result<()> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let mut chunk = [0u8; 16 * 1024];
        while *budget > 0 {
            let want = chunk.len().min(*budget);
            let n = open.file.read(&mut chunk[..want])?;
            if n == 0 {
                break;
            }
            open.pos += n as u64;
            *budget -= n;
            split_lines(
                &chunk[..n],
                self.max_line,
                &mut self.partial,
                &mut self.skipping,
                out,
            );
        }
        Ok(())
    }
}

/// Appends the complete lines of `bytes` to `out`, carrying an unfinished line in `partial`;
/// a line that grows past `max_line` is dropped up to its newline and counted once.
fn split_lines(
    bytes: &[u8],
    max_line: usize,
    partial: &mut Vec<u8>,
    skipping: &mut bool,
    out: &mut Polled,
) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let (piece, ended) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], true),
            None => (rest, false),
        };
        rest = &rest[(piece.len() + usize::from(ended)).min(rest.len())..];
        if !*skipping {
            if partial.len() + piece.len() > max_line {
                partial.clear();
                *skipping = true;
                out.too_long += 1;
            } else {
                partial.extend_from_slice(piece);
            }
        }
        if ended {
            if !*skipping {
                out.lines.push(std::mem::take(partial));
            }
            *skipping = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn lines(p: &Polled) -> Vec<String> {
        p.lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error.log");
        (dir, path)
    }

    #[test]
    fn starts_at_the_end_and_returns_only_new_complete_lines() {
        let (_dir, path) = setup();
        append(&path, "old history\n");
        let mut tail = Tail::new(&path, 100);
        assert!(tail.poll().unwrap().lines.is_empty());
        append(&path, "one\ntw");
        assert_eq!(lines(&tail.poll().unwrap()), ["one"]);
        append(&path, "o\nthree\n");
        assert_eq!(lines(&tail.poll().unwrap()), ["two", "three"]);
    }

    #[test]
    fn a_file_that_appears_later_is_read_from_its_end_then_followed() {
        let (_dir, path) = setup();
        let mut tail = Tail::new(&path, 100);
        assert_eq!(tail.poll().unwrap(), Polled::default());
        append(&path, "before\n");
        assert!(tail.poll().unwrap().lines.is_empty());
        append(&path, "after\n");
        assert_eq!(lines(&tail.poll().unwrap()), ["after"]);
    }

    #[test]
    fn follows_a_rename_and_create_rotation_without_losing_lines() {
        let (dir, path) = setup();
        append(&path, "");
        let mut tail = Tail::new(&path, 100);
        tail.poll().unwrap();
        append(&path, "last of old\n");
        std::fs::rename(&path, dir.path().join("error.log.1")).unwrap();
        // nginx keeps writing to the renamed file until it reopens its logs.
        append(&dir.path().join("error.log.1"), "late in old\n");
        append(&path, "first of new\n");
        let polled = tail.poll().unwrap();
        assert!(polled.reopened);
        assert_eq!(
            lines(&polled),
            ["last of old", "late in old", "first of new"]
        );
        append(&path, "second of new\n");
        assert_eq!(lines(&tail.poll().unwrap()), ["second of new"]);
    }

    #[test]
    fn follows_a_truncation_from_the_new_start() {
        let (_dir, path) = setup();
        append(&path, "");
        let mut tail = Tail::new(&path, 100);
        tail.poll().unwrap();
        append(&path, "a fairly long line before truncation\n");
        tail.poll().unwrap();
        std::fs::write(&path, "").unwrap();
        append(&path, "short\n");
        let polled = tail.poll().unwrap();
        assert!(polled.reopened);
        assert_eq!(lines(&polled), ["short"]);
    }

    #[test]
    fn a_line_over_the_bound_is_skipped_and_counted_without_being_buffered() {
        let (_dir, path) = setup();
        append(&path, "");
        let mut tail = Tail::new(&path, 10);
        tail.poll().unwrap();
        append(&path, "ok\n");
        append(&path, &"x".repeat(25));
        let polled = tail.poll().unwrap();
        assert_eq!((lines(&polled), polled.too_long), (vec!["ok".into()], 1));
        assert!(tail.partial.is_empty(), "the long line is not kept");
        append(&path, &"x".repeat(25));
        append(&path, "\nfine\n");
        let polled = tail.poll().unwrap();
        assert_eq!((lines(&polled), polled.too_long), (vec!["fine".into()], 0));
        append(&path, "0123456789\n");
        assert_eq!(lines(&tail.poll().unwrap()), ["0123456789"]);
    }
}

//! Finding the nginx master and its workers: the pid file, `/proc/PID/cmdline`, `/proc/*/stat`.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::{NginxError, PidFileProblem};

/// What the master's `/proc/PID/cmdline` starts with (nginx rewrites its argv to say so).
const MASTER_TITLE: &str = "nginx: master process";

/// The running process named by `pid_file`.
///
/// Missing, unreadable, empty and garbage files, ids of 0 or below (which `kill` would take
/// for process groups) and ids of processes that are not running are distinct errors.
pub fn read_pid(pid_file: &Path) -> Result<Pid, NginxError> {
    let problem = |reason| NginxError::PidFile {
        path: pid_file.to_owned(),
        reason,
    };
    let text = match fs::read(pid_file) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(problem(PidFileProblem::Missing))
        }
        Err(e) => return Err(problem(PidFileProblem::Unreadable(e))),
    };
    let pid = parse_pid(&text).map_err(problem)?;
    // Signal 0 checks existence only. EPERM means it exists but belongs to someone else.
    match kill(pid, None) {
        Ok(()) | Err(Errno::EPERM) => Ok(pid),
        Err(_) => Err(problem(PidFileProblem::NotRunning(pid))),
    }
}

/// The process id in the text of a pid file: one positive number, white space around it.
pub fn parse_pid(text: &str) -> Result<Pid, PidFileProblem> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(PidFileProblem::Empty);
    }
    match trimmed.parse::<i32>() {
        Ok(n) if n > 0 => Ok(Pid::from_raw(n)),
        _ => Err(PidFileProblem::Garbage(trimmed.chars().take(64).collect())),
    }
}

/// `/proc/PID/cmdline` with its NUL separators read as spaces and trailing ones dropped
/// (empty for a zombie or a kernel thread).
pub fn read_cmdline(pid: Pid) -> Result<String, NginxError> {
    let path = format!("/proc/{pid}/cmdline");
    let bytes = fs::read(&path).map_err(|e| NginxError::io("read", path, e))?;
    let text = String::from_utf8_lossy(&bytes).replace('\0', " ");
    Ok(text.trim_end().to_owned())
}

/// Whether a command line (as `read_cmdline` returns it) is an nginx master's:
/// `nginx: master process /usr/sbin/nginx -c …`.
pub fn looks_like_nginx_master(cmdline: &str) -> bool {
    cmdline.trim_start().starts_with(MASTER_TITLE)
}

/// Whether `pid` is a running nginx master; false when its command line cannot be read.
pub fn is_nginx_master(pid: Pid) -> bool {
    read_cmdline(pid).is_ok_and(|cmdline| looks_like_nginx_master(&cmdline))
}

/// The ids of the processes whose parent is `master`: its workers, cache manager and loader,
/// old generations still draining included.
pub fn worker_pids(master: Pid) -> Result<BTreeSet<i32>, NginxError> {
    let entries = fs::read_dir("/proc").map_err(|e| NginxError::io("list", "/proc", e))?;
    let mut children = BTreeSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // A process may exit between the listing and the read; it is no worker then.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if parse_stat(&stat).is_some_and(|s| s.ppid == master.as_raw()) {
            children.insert(pid);
        }
    }
    Ok(children)
}

/// The fields of a `/proc/PID/stat` line that upstreamd needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The process id.
    pub pid: i32,
    /// The executable's name, up to 15 bytes, as the kernel shows it.
    pub comm: String,
    /// The state letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// The parent's process id.
    pub ppid: i32,
}

/// Parses `pid (comm) state ppid …`. The comm may hold spaces and parentheses, so it runs
/// from the first `(` to the *last* `)` of the line; `None` for anything malformed.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let open = line.find(" (")?;
    let close = line.rfind(')')?;
    if close < open {
        return None;
    }
    let pid = line[..open].trim().parse().ok()?;
    let comm = line[open + 2..close].to_owned();
    let mut rest = line[close + 1..].split_ascii_whitespace();
    let mut state_field = rest.next()?.chars();
    let state = state_field.next()?;
    if state_field.next().is_some() {
        return None;
    }
    let ppid = rest.next()?.parse().ok()?;
    Some(Stat {
        pid,
        comm,
        state,
        ppid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(result: Result<Pid, NginxError>) -> PidFileProblem {
        match result {
            Err(NginxError::PidFile { reason, .. }) => reason,
            other => panic!("expected a pid file error, got {other:?}"),
        }
    }

    #[test]
    fn read_pid_of_a_missing_file_says_missing() {
        let dir = tempfile::tempdir().unwrap();
        let result = read_pid(&dir.path().join("nginx.pid"));
        assert!(matches!(problem(result), PidFileProblem::Missing));
    }

    #[test]
    fn read_pid_of_an_empty_file_says_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nginx.pid");
        fs::write(&path, " \n").unwrap();
        assert!(matches!(problem(read_pid(&path)), PidFileProblem::Empty));
    }

    #[test]
    fn read_pid_of_garbage_says_garbage_and_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nginx.pid");
        for text in ["12ab\n", "-1\n", "0", "1 2", "99999999999999"] {
            fs::write(&path, text).unwrap();
            match problem(read_pid(&path)) {
                PidFileProblem::Garbage(shown) => assert_eq!(shown, text.trim()),
                other => panic!("{text:?}: expected garbage, got {other:?}"),
            }
        }
    }

    #[test]
    fn read_pid_of_a_process_that_is_not_running_says_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nginx.pid");
        // Above any pid_max Linux allows (2^22), so no process can have it.
        fs::write(&path, "2000000000\n").unwrap();
        let err = read_pid(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains("names process 2000000000, which is not running"),
            "{err}"
        );
        assert!(matches!(problem(Err(err)), PidFileProblem::NotRunning(_)));
    }

    #[test]
    fn read_pid_of_a_running_process_returns_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nginx.pid");
        fs::write(&path, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(read_pid(&path).unwrap().as_raw() as u32, std::process::id());
    }

    #[test]
    fn parse_stat_reads_a_comm_with_spaces_and_parentheses() {
        let line =
            "4242 (evil) (name ) x) S 17 4242 4242 0 -1 4194560 108 0 0 0 0 0 0 0 20 0 1 0\n";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            Stat {
                pid: 4242,
                comm: "evil) (name ) x".into(),
                state: 'S',
                ppid: 17
            }
        );
    }

    #[test]
    fn parse_stat_reads_a_plain_nginx_worker_line() {
        let line = "1001 (nginx) S 1000 1000 1000 0 -1 4194624 20 0 0 0 0 0 0 0 20 0 1 0 900 0 0";
        assert_eq!(
            parse_stat(line).map(|s| (s.pid, s.ppid)),
            Some((1001, 1000))
        );
    }

    #[test]
    fn parse_stat_rejects_malformed_lines() {
        for line in [
            "",
            "12",
            "12 (x",
            "x (y) S 1",
            "12 (y) S",
            "12 (y) S zz",
            "12 (y) SS 1",
            "12 y) S 1",
        ] {
            assert_eq!(parse_stat(line), None, "{line:?}");
        }
    }

    #[test]
    fn our_own_stat_line_parses_to_our_pid_and_parent() {
        let stat = parse_stat(&fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert_eq!(stat.pid as u32, std::process::id());
        assert_eq!(stat.ppid as u32, std::os::unix::process::parent_id());
    }

    #[test]
    fn a_master_title_is_recognised_with_nul_or_space_separators() {
        assert!(looks_like_nginx_master(
            "nginx: master process /usr/sbin/nginx -g daemon on;"
        ));
        assert!(looks_like_nginx_master(
            "nginx: master process nginx -p /tmp/x -c conf/nginx.conf"
        ));
        assert!(!looks_like_nginx_master("nginx: worker process"));
        assert!(!looks_like_nginx_master("sleep 30"));
        assert!(!looks_like_nginx_master(""));
    }

    #[test]
    fn worker_pids_finds_the_children_of_a_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = Pid::from_raw(std::process::id() as i32);
        let children = worker_pids(me).unwrap();
        // Best effort: the test still fails on the assertion if the kill fails.
        let _ = child.kill();
        let _ = child.wait();
        assert!(children.contains(&(child.id() as i32)), "{children:?}");
        assert!(!is_nginx_master(me));
    }
}

//! Old nginx worker generations still alive: children of the master titled
//! `nginx: worker process is shutting down`, grouped by when they started.
//!
//! Why start times and not the reloads upstreamd remembers (`ReloadProof::old_workers`): the
//! count must hold whoever reloaded nginx (an operator, `systemctl reload`, another tool) and
//! survive an upstreamd restart, and both break a remembered history. The grouping is sound
//! because nginx's master forks a generation's workers in one loop (within a few ms) and then
//! sleeps a fixed 100 ms (`ngx_msleep(100)`) before it can handle the next SIGHUP, so two
//! generations start at least 100 ms apart: a gap of [`GENERATION_GAP`] or more between
//! sorted start times begins a new generation.

use std::fs;
use std::time::Duration;

use nix::unistd::Pid;
use serde::Serialize;

use super::process::{parse_stat, read_cmdline, worker_pids};
use super::NginxError;

/// The title nginx gives a worker that has been told to stop and still serves requests.
pub const SHUTTING_DOWN_TITLE: &str = "nginx: worker process is shutting down";

/// Start times this far apart or more belong to different generations (half nginx's 100 ms).
pub const GENERATION_GAP: Duration = Duration::from_millis(50);

/// The old worker generations of one nginx master.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OldGenerations {
    /// Generations with at least one worker still shutting down.
    pub generations: usize,
    /// Workers still shutting down, across those generations.
    pub workers: usize,
}

/// Groups start times (in clock ticks) into generations: sorted, a gap of `gap_ticks` or more
/// starts a new one.
pub fn group(mut start_ticks: Vec<u64>, gap_ticks: u64) -> OldGenerations {
    start_ticks.sort_unstable();
    let generations = match start_ticks.first() {
        None => 0,
        Some(_) => {
            1 + start_ticks
                .windows(2)
                .filter(|w| w[1] - w[0] >= gap_ticks.max(1))
                .count()
        }
    };
    OldGenerations {
        generations,
        workers: start_ticks.len(),
    }
}

/// The start time (field 22, clock ticks after boot) of a `/proc/PID/stat` line.
pub fn start_ticks(stat_line: &str) -> Option<u64> {
    // Fields after the comm (which may hold spaces) begin with the state, field 3.
    let after_comm = &stat_line[stat_line.rfind(')')? + 1..];
    after_comm
        .split_ascii_whitespace()
        .nth(22 - 3)?
        .parse()
        .ok()
}

/// The old worker generations of `master`, read from `/proc`. A child that exits while it is
/// read is not counted.
pub fn old_generations(master: Pid) -> Result<OldGenerations, NginxError> {
    let mut starts = Vec::new();
    for pid in worker_pids(master)? {
        let pid = Pid::from_raw(pid);
        let shutting_down =
            read_cmdline(pid).is_ok_and(|c| c.trim_start().starts_with(SHUTTING_DOWN_TITLE));
        if !shutting_down {
            continue;
        }
        let Ok(line) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // A zombie has not been reaped yet but serves nobody.
        if parse_stat(&line).is_some_and(|s| s.state == 'Z') {
            continue;
        }
        if let Some(start) = start_ticks(&line) {
            starts.push(start);
        }
    }
    Ok(group(starts, gap_ticks()))
}

/// [`GENERATION_GAP`] in this kernel's clock ticks (`USER_HZ`, 100 on Linux).
fn gap_ticks() -> u64 {
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |t| t.max(1) as u64);
    (per_sec * GENERATION_GAP.as_millis() as u64 / 1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_shutting_down_workers_is_no_old_generation() {
        assert_eq!(group(vec![], 5), OldGenerations::default());
    }

    #[test]
    fn workers_started_within_the_gap_are_one_generation() {
        let g = group(vec![1000, 1001, 1000, 1002], 5);
        assert_eq!((g.generations, g.workers), (1, 4));
    }

    #[test]
    fn reloads_a_gap_apart_make_separate_generations_whatever_the_order() {
        let g = group(vec![2030, 1000, 1500, 1001, 2031, 1501], 5);
        assert_eq!((g.generations, g.workers), (3, 6));
        assert_eq!(group(vec![100, 105], 5).generations, 2);
        assert_eq!(group(vec![100, 104], 5).generations, 1);
    }

    #[test]
    fn start_ticks_reads_field_22_after_a_comm_with_spaces() {
        let line =
            "4242 (a) b) S 17 4242 4242 0 -1 4194560 108 0 0 0 0 0 0 0 20 0 1 0 987654 1000 20";
        assert_eq!(start_ticks(line), Some(987654));
        assert_eq!(start_ticks("12 (x) S 1 2 3"), None);
    }

    #[test]
    fn our_own_start_time_is_read_from_proc() {
        let line = fs::read_to_string("/proc/self/stat").unwrap();
        assert!(start_ticks(&line).is_some(), "{line}");
    }

    #[test]
    fn a_process_without_nginx_children_has_no_old_generations() {
        let me = Pid::from_raw(std::process::id() as i32);
        assert_eq!(old_generations(me).unwrap(), OldGenerations::default());
    }
}

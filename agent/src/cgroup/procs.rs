//! The processes of a container's group (runc's `ps`), from the guest's /proc.
//!
//! Every value read here is bounded: at most [`MAX_PROCESSES`] processes, a walk of at most
//! [`MAX_GROUPS`] groups (a container can make sub-groups), command lines cut at [`MAX_CMD`]
//! bytes. A process that exits while it is read is left out.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use agent_protocol::{MAX_PROCESSES, ProcessEntry};

use super::CgroupError;
use super::parse::read_bounded;

/// Most groups walked below a container's group.
const MAX_GROUPS: usize = 256;
/// Longest command line kept, in bytes.
const MAX_CMD: usize = 512;

/// The processes in `group` and its sub-groups, in pid order.
pub fn list(group: &Path) -> Result<Vec<ProcessEntry>, CgroupError> {
    let mut pids = Vec::new();
    let mut todo = vec![group.to_path_buf()];
    let mut walked = 0;
    while let Some(dir) = todo.pop() {
        walked += 1;
        if walked > MAX_GROUPS {
            break;
        }
        let procs = match read_bounded(&dir.join("cgroup.procs")) {
            Ok(s) => s,
            // A sub-group removed meanwhile.
            Err(_) if dir != group => continue,
            Err(e) => return Err(e),
        };
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            todo.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    let clock = Clock::now();
    Ok(pids
        .into_iter()
        .filter_map(|pid| entry(pid, &clock))
        .take(MAX_PROCESSES)
        .collect())
}

/// What turns /proc's clock ticks into times.
struct Clock {
    ticks: u64,
    boot_time: u64,
    uptime: u64,
}

impl Clock {
    fn now() -> Self {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let stat = small("/proc/stat").unwrap_or_default();
        let boot_time = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let uptime = small("/proc/uptime")
            .and_then(|s| s.split('.').next().and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0);
        Self {
            ticks: if ticks > 0 { ticks as u64 } else { 100 },
            boot_time,
            uptime,
        }
    }
}

/// A small /proc file, or None (gone, unreadable).
fn small(path: impl AsRef<Path>) -> Option<String> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let mut buf = Vec::new();
    (&mut f).take(64 * 1024).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn entry(pid: u32, clock: &Clock) -> Option<ProcessEntry> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let stat = parse_stat(&small(base.join("stat"))?)?;
    let uid = small(base.join("status"))?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let mut cmd = small(base.join("cmdline"))
        .unwrap_or_default()
        .trim_end_matches('\0')
        .replace('\0', " ");
    if cmd.is_empty() {
        cmd = format!("[{}]", stat.comm);
    }
    if cmd.len() > MAX_CMD {
        let mut cut = MAX_CMD;
        while !cmd.is_char_boundary(cut) {
            cut -= 1;
        }
        cmd.truncate(cut);
    }
    let start = stat.start_ticks / clock.ticks;
    Some(ProcessEntry {
        pid,
        ppid: stat.ppid,
        uid,
        state: stat.state,
        tty: tty_name(stat.tty_nr),
        started: clock.boot_time + start,
        cpu_ms: stat.cpu_ticks.saturating_mul(1000) / clock.ticks,
        elapsed: clock.uptime.saturating_sub(start),
        cmd,
    })
}

/// The fields of /proc/PID/stat ps needs.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: char,
    ppid: u32,
    tty_nr: u64,
    cpu_ticks: u64,
    start_ticks: u64,
}

/// Parses /proc/PID/stat: `pid (comm) state ppid pgrp session tty_nr tpgid flags minflt
/// cminflt majflt cmajflt utime stime cutime cstime priority nice threads itrealvalue
/// starttime ...`; comm may hold spaces and parentheses, so the fields start after the last
/// `)`.
fn parse_stat(s: &str) -> Option<Stat> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_owned();
    let f: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    let num = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some(Stat {
        comm,
        state: f.first()?.chars().next()?,
        ppid: u32::try_from(num(1)?).ok()?,
        tty_nr: num(4)?,
        cpu_ticks: num(11)?.saturating_add(num(12)?),
        start_ticks: num(19)?,
    })
}

/// The name ps prints for a terminal device number (`pts/0`, `tty1`, `console`).
fn tty_name(nr: u64) -> Option<String> {
    let major = (nr >> 8) & 0xfff;
    let minor = (nr & 0xff) | ((nr >> 12) & 0xfff00);
    match major {
        0 => None,
        136..=143 => Some(format!("pts/{}", minor + (major - 136) * 256)),
        4 if minor < 64 => Some(format!("tty{minor}")),
        4 => Some(format!("ttyS{}", minor - 64)),
        5 if minor == 1 => Some("console".into()),
        _ => Some(format!("{major}:{minor}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_with_odd_command_names() {
        let s = "42 (a (b) c) S 1 42 42 34816 42 4194560 100 0 0 0 7 3 0 0 20 0 1 0 1234 \
                 4 5 6\n";
        assert_eq!(
            parse_stat(s),
            Some(Stat {
                comm: "a (b) c".into(),
                state: 'S',
                ppid: 1,
                tty_nr: 34816,
                cpu_ticks: 10,
                start_ticks: 1234,
            })
        );
        for bad in [
            "",
            "42 comm S 1",
            "42 (x) S",
            "42 (x) S one 2 3 4 5 6 7 8 9 10 11 12",
        ] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn terminal_numbers_name_their_devices() {
        assert_eq!(tty_name(0), None);
        assert_eq!(tty_name(34816).as_deref(), Some("pts/0")); // 136:0
        assert_eq!(tty_name((136 << 8) | 5).as_deref(), Some("pts/5"));
        assert_eq!(tty_name((4 << 8) | 1).as_deref(), Some("tty1"));
        assert_eq!(tty_name((4 << 8) | 64).as_deref(), Some("ttyS0"));
        assert_eq!(tty_name((5 << 8) | 1).as_deref(), Some("console"));
    }

    #[test]
    fn this_process_is_listed_from_proc() {
        let clock = Clock::now();
        let me = entry(std::process::id(), &clock).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw() as u32);
        assert!(me.cmd.len() <= MAX_CMD && !me.cmd.is_empty(), "{me:?}");
        assert!(
            me.started >= clock.boot_time && clock.boot_time > 0,
            "{me:?}"
        );
        assert!(entry(u32::MAX, &clock).is_none());
    }

    #[test]
    fn a_group_lists_its_processes_and_refuses_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("cgroup.procs"), "1\nnot-a-pid\n").unwrap();
        let got: Vec<u32> = list(dir.path()).unwrap().iter().map(|p| p.pid).collect();
        assert_eq!(got, [1, std::process::id()]);
        assert!(list(&dir.path().join("missing")).is_err());
    }
}

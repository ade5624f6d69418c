//! `ps`: the container's processes, as its VM's agent lists them (those in the container's
//! cgroup in the guest), in ps(1)'s columns.
//!
//! runc runs the host's ps(1) with the caller's arguments and keeps the lines of the
//! container's pids; a container's processes here live in the guest, where no ps(1) need exist,
//! so the agent reads the guest's /proc and the table is printed here in the two shapes runc's
//! users ask for: ps's full format (`-ef`, the default; `-f`, `-e`) and its BSD format (`-x`,
//! `-e -x`, `x`, `ax`, `aux`). Other arguments are refused with one line. `--format json` stays
//! the host pid of the container's process (the VM's), as engines run host tools on it.

use std::time::{SystemTime, UNIX_EPOCH};

use agent_protocol::ProcessEntry;
use anyhow::{Result, bail};

/// The table shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `UID PID PPID C STIME TTY TIME CMD`.
    Full,
    /// `PID TTY STAT TIME COMMAND`.
    Bsd,
}

/// The shape ps(1) would print for `args`.
pub fn shape(args: &[String]) -> Result<Shape> {
    let joined: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(match joined.as_slice() {
        [] | ["-ef"] | ["-fe"] | ["-f"] | ["-e"] | ["-e", "-f"] | ["-f", "-e"] | ["-A"] => {
            Shape::Full
        }
        ["-x"]
        | ["-e", "-x"]
        | ["-x", "-e"]
        | ["-ex"]
        | ["-xe"]
        | ["x"]
        | ["ax"]
        | ["aux"]
        | ["-aux"] => Shape::Bsd,
        _ => bail!(
            "ps {}: a container's processes are listed by its VM's agent, in ps's -ef or \
             -e -x columns only",
            args.join(" ")
        ),
    })
}

/// The header line of `shape`.
pub fn header(shape: Shape) -> &'static str {
    match shape {
        Shape::Full => "UID          PID    PPID  C STIME TTY          TIME CMD",
        Shape::Bsd => "    PID TTY      STAT   TIME COMMAND",
    }
}

/// The table: header and one line per process; `user` names a uid; `now` is the Unix time.
pub fn table(
    shape: Shape,
    procs: &[ProcessEntry],
    now: u64,
    user: &dyn Fn(u32) -> String,
) -> String {
    let mut out = format!("{}\n", header(shape));
    for p in procs {
        let tty = p.tty.as_deref().unwrap_or("?");
        let cpu_s = p.cpu_ms / 1000;
        let line = match shape {
            Shape::Full => {
                let c = (p.cpu_ms / 10).checked_div(p.elapsed).unwrap_or(0).min(99);
                format!(
                    "{:<8} {:>7} {:>7} {:>2} {:<5} {:<8} {:02}:{:02}:{:02} {}",
                    user(p.uid),
                    p.pid,
                    p.ppid,
                    c,
                    stime(p.started, now),
                    tty,
                    cpu_s / 3600,
                    cpu_s / 60 % 60,
                    cpu_s % 60,
                    p.cmd
                )
            }
            Shape::Bsd => format!(
                "{:>7} {:<8} {:<4} {:>3}:{:02} {}",
                p.pid,
                tty,
                p.state,
                cpu_s / 60,
                cpu_s % 60,
                p.cmd
            ),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// ps's STIME: `HH:MM` within a day, else `MonDD` (UTC).
fn stime(started: u64, now: u64) -> String {
    if now.saturating_sub(started) < 86_400 {
        format!("{:02}:{:02}", started / 3600 % 24, started / 60 % 60)
    } else {
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let (_, m, d) = super::state::civil_from_days((started / 86_400) as i64);
        format!("{}{d:02}", MONTHS[(m as usize).clamp(1, 12) - 1])
    }
}

/// The host's name for `uid` (as ps(1) on the host names it), else the number.
pub fn host_user(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// The Unix time now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, cmd: &str) -> ProcessEntry {
        ProcessEntry {
            pid,
            ppid: 1,
            uid: 0,
            state: 'S',
            tty: None,
            started: 1_800_000_000,
            cpu_ms: 3_723_000,
            elapsed: 10_000,
            cmd: cmd.into(),
        }
    }

    #[test]
    fn shapes_follow_the_arguments_runc_users_give() {
        let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(shape(&a(&[])).unwrap(), Shape::Full);
        assert_eq!(shape(&a(&["-ef"])).unwrap(), Shape::Full);
        assert_eq!(shape(&a(&["-e", "-x"])).unwrap(), Shape::Bsd);
        assert_eq!(shape(&a(&["aux"])).unwrap(), Shape::Bsd);
        let e = shape(&a(&["-o", "pid"])).unwrap_err().to_string();
        assert!(e.starts_with("ps -o pid: "), "{e}");
    }

    #[test]
    fn tables_have_ps_columns() {
        let procs = [p(7, "sleep 600"), {
            let mut q = p(9, "sh");
            q.tty = Some("pts/0".into());
            q.state = 'R';
            q
        }];
        let now = 1_800_000_600;
        let full = table(Shape::Full, &procs, now, &|_| "root".into());
        let lines: Vec<&str> = full.lines().collect();
        assert_eq!(lines.len(), 3);
        let cols: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            cols,
            ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        // 3723 s of CPU in 10000 s: 37 %; started 1_800_000_000 = 08:00 UTC.
        assert_eq!(
            row,
            [
                "root", "7", "1", "37", "08:00", "?", "01:02:03", "sleep", "600"
            ]
        );
        assert!(lines[2].contains(" pts/0 "), "{full}");

        let bsd = table(Shape::Bsd, &procs, now, &|_| unreachable!());
        let lines: Vec<&str> = bsd.lines().collect();
        let cols: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(cols, ["PID", "TTY", "STAT", "TIME", "COMMAND"]);
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(row, ["9", "pts/0", "R", "62:03", "sh"]);
        // Older than a day: the date.
        assert_eq!(stime(1_800_000_000, 1_800_000_000 + 2 * 86_400), "Jan15");
    }
}

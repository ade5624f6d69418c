//! Bounded reads and strict parsing of cgroup v2 files, and runc's v1 → v2
//! conversions. Hostile or garbled content is an error, never a panic.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use agent_protocol::resources::{MAX_STAT_ENTRIES, valid_stat_key};

use super::CgroupError;

/// Longest cgroup (or /proc) file the agent reads. `memory.stat` is about
/// 1.5 KiB on 6.1; anything near this bound is not a cgroup file.
pub const MAX_FILE: u64 = 64 * 1024;

/// Reads `path` whole, at most [`MAX_FILE`] bytes, as UTF-8. Opened
/// non-blocking so a FIFO planted in a fake root cannot hang the agent.
pub fn read_bounded(path: &Path) -> Result<String, CgroupError> {
    let io = |source| CgroupError::Io {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    let mut buf = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(parse_err(path, format!("larger than {MAX_FILE} bytes")));
    }
    String::from_utf8(buf).map_err(|_| parse_err(path, "not UTF-8".into()))
}

pub(super) fn parse_err(path: &Path, reason: String) -> CgroupError {
    CgroupError::Parse {
        path: path.display().to_string(),
        reason,
    }
}

fn number(s: &str) -> Result<u64, String> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{:?} is not a number", truncate(s)));
    }
    s.parse::<u64>()
        .map_err(|_| format!("{:?} does not fit in 64 bits", truncate(s)))
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// A single-value file such as `memory.current` or `pids.max`: a number,
/// or `max` (`u64::MAX`), then a newline.
pub fn parse_value(text: &str) -> Result<u64, String> {
    let t = text.strip_suffix('\n').unwrap_or(text);
    if t == "max" {
        return Ok(u64::MAX);
    }
    number(t)
}

/// A flat keyed file (`memory.stat`, `memory.events`, `cpu.stat`): lines of
/// `key value`, at most [`MAX_STAT_ENTRIES`], keys as
/// [`valid_stat_key`], each once.
pub fn parse_keyed(text: &str) -> Result<Vec<(String, u64)>, String> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if out.len() == MAX_STAT_ENTRIES {
            return Err(format!("more than {MAX_STAT_ENTRIES} lines"));
        }
        let mut parts = line.split(' ');
        let (Some(k), Some(v), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {:?} is not \"key value\"", truncate(line)));
        };
        if !valid_stat_key(k) {
            return Err(format!("bad key {:?}", truncate(k)));
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!("key {k:?} appears twice"));
        }
        out.push((k.to_owned(), number(v)?));
    }
    Ok(out)
}

/// The value of `key` in a parsed keyed file (0 when absent: the kernel
/// omits counters it does not keep, e.g. throttling without CFS bandwidth).
pub fn keyed(entries: &[(String, u64)], key: &str) -> u64 {
    entries
        .iter()
        .find(|(k, _)| k == key)
        .map_or(0, |&(_, v)| v)
}

/// `cpu.max`: `QUOTA PERIOD` where QUOTA is a number or `max` (`None`).
pub fn parse_cpu_max(text: &str) -> Result<(Option<u64>, u64), String> {
    let t = text.strip_suffix('\n').unwrap_or(text);
    let mut parts = t.split(' ');
    let (Some(q), Some(p), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{:?} is not \"QUOTA PERIOD\"", truncate(t)));
    };
    let quota = if q == "max" { None } else { Some(number(q)?) };
    Ok((quota, number(p)?))
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_mem_total(text: &str) -> Result<u64, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .ok_or("no MemTotal line")?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(kb), Some("kB"), None) => number(kb)?
            .checked_mul(1024)
            .ok_or_else(|| "MemTotal overflows".to_owned()),
        _ => Err(format!(
            "MemTotal line {:?} is not \"N kB\"",
            truncate(line)
        )),
    }
}

/// runc's `ConvertCPUSharesToCgroupV2Value`: shares 2..=262144 onto weight
/// 1..=10000.
pub fn shares_to_weight(shares: u64) -> u64 {
    1 + (shares.saturating_sub(2) * 9999) / 262_142
}

/// runc's `ConvertMemorySwapToCgroupV2Value`: OCI's memory+swap total to
/// `memory.swap.max` (swap alone), given the memory limit in force (-1:
/// unlimited). -1 is `max`.
pub fn swap_to_v2(memory_swap: i64, memory: i64) -> Result<i64, String> {
    if memory_swap == -1 {
        return Ok(-1);
    }
    if memory <= 0 {
        return Err("unable to set swap limit without memory limit".into());
    }
    if memory_swap < memory {
        return Err("memory+swap limit should be >= memory limit".into());
    }
    Ok(memory_swap - memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_value_numbers_and_max() {
        assert_eq!(parse_value("4096\n"), Ok(4096));
        assert_eq!(parse_value("max\n"), Ok(u64::MAX));
        assert_eq!(parse_value("0"), Ok(0));
        for bad in [
            "",
            "\n",
            "-1\n",
            " 1\n",
            "1 \n",
            "1\n\n",
            "max max\n",
            "18446744073709551616\n",
            "99999999999999999999999999\n",
            "1\0\n",
            "0x10\n",
        ] {
            assert!(parse_value(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_parse_keyed_cpu_stat_and_memory_events() {
        let cpu = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\n\
                   nr_throttled 2\nthrottled_usec 300\n";
        let e = parse_keyed(cpu).unwrap();
        assert_eq!(keyed(&e, "usage_usec"), 1500);
        assert_eq!(keyed(&e, "throttled_usec"), 300);
        assert_eq!(keyed(&e, "absent"), 0);
        let ev =
            parse_keyed("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n").unwrap();
        assert_eq!(keyed(&ev, "max"), 7);
        assert_eq!(keyed(&ev, "oom_kill"), 1);
        assert_eq!(ev.len(), 6);
    }

    #[test]
    fn test_parse_keyed_hostile_content_refused() {
        let many: String = (0..=MAX_STAT_ENTRIES)
            .map(|i| format!("k{i} 1\n"))
            .collect();
        for bad in [
            "anon\n",
            "anon 1 2\n",
            "anon  1\n",
            "anon -1\n",
            "Anon 1\n",
            "an\0on 1\n",
            "anon 1\nanon 2\n",
            "anon 184467440737095516150\n",
            "\u{e9}t\u{e9} 1\n",
            &many,
        ] {
            assert!(
                parse_keyed(bad).is_err(),
                "{:?} accepted",
                &bad[..bad.len().min(40)]
            );
        }
        assert_eq!(parse_keyed("").unwrap(), vec![]);
    }

    #[test]
    fn test_parse_cpu_max_forms() {
        assert_eq!(parse_cpu_max("max 100000\n"), Ok((None, 100_000)));
        assert_eq!(parse_cpu_max("50000 100000\n"), Ok((Some(50_000), 100_000)));
        for bad in ["max\n", "1 2 3\n", "max max\n", "", "-1 100000\n"] {
            assert!(parse_cpu_max(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_parse_mem_total() {
        let t = "MemTotal:         250000 kB\nMemFree:          1000 kB\n";
        assert_eq!(parse_mem_total(t), Ok(250_000 * 1024));
        for bad in [
            "",
            "MemFree: 1 kB\n",
            "MemTotal: 1 MB\n",
            "MemTotal: x kB\n",
            "MemTotal: 99999999999999999999 kB\n",
            "MemTotal: 18446744073709551 kB\n",
        ] {
            assert!(parse_mem_total(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_conversions_match_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(swap_to_v2(-1, 100), Ok(-1));
        assert_eq!(swap_to_v2(300, 100), Ok(200));
        assert_eq!(swap_to_v2(100, 100), Ok(0));
        assert!(swap_to_v2(50, 100).is_err());
        assert!(swap_to_v2(300, -1).is_err());
    }

    #[test]
    fn test_read_bounded_refuses_large_binary_and_fifo_files() {
        let dir = std::env::temp_dir().join(format!("cg-parse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big");
        std::fs::write(&big, vec![b'1'; MAX_FILE as usize + 1]).unwrap();
        assert!(matches!(read_bounded(&big), Err(CgroupError::Parse { .. })));
        let bin = dir.join("bin");
        std::fs::write(&bin, [0xff, 0xfe, b'\n']).unwrap();
        assert!(matches!(read_bounded(&bin), Err(CgroupError::Parse { .. })));
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Non-blocking open of a FIFO without a writer reads EOF at once.
        assert_eq!(read_bounded(&fifo).unwrap(), "");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        assert!(matches!(read_bounded(&link), Err(CgroupError::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

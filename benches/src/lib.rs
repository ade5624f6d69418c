//! Helpers shared by kata-snap's benchmark programs: statistics and child-process timing.

#![deny(missing_docs)]

pub mod run_bench;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Median and spread of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 90th percentile.
    pub p90: f64,
}

/// Summarizes `values` (any order). `None` when empty.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some(Summary {
        n: v.len(),
        median: pick(0.5),
        p10: pick(0.1),
        p90: pick(0.9),
    })
}

/// Finds the `kata-snap` binary: `--kata-snap`, else next to this program (same target dir).
pub fn kata_snap_binary(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    let path = match explicit {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("kata-snap"),
    };
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it first (cargo build --release --bin kata-snap) or pass --kata-snap",
            path.display()
        ))
    }
}

/// What one `kata-snap boot --timing` run showed, timed from outside and inside.
#[derive(Debug, Clone, Default)]
pub struct BootTiming {
    /// Spawn to the first byte on the child's stdout (the guest's first serial byte).
    pub external_first_byte: Option<Duration>,
    /// Spawn to the child's exit.
    pub external_exit: Duration,
    /// The VMM's own report, parsed from `--timing` (milliseconds).
    pub internal: Vec<(String, f64)>,
    /// The exit status.
    pub status: Option<i32>,
    /// Everything on stderr.
    pub stderr: String,
}

impl BootTiming {
    /// A value the VMM reported, e.g. `process start -> READY`.
    pub fn internal_ms(&self, key: &str) -> Option<f64> {
        self.internal
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }
}

/// Runs `kata-snap boot --timing ARGS` once and times it.
pub fn time_boot(bin: &Path, args: &[&str]) -> std::io::Result<BootTiming> {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .arg("boot")
        .arg("--timing")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut first = [0u8; 1];
    let external_first_byte = match stdout.read(&mut first)? {
        0 => None,
        _ => Some(start.elapsed()),
    };
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest)?;
    let mut stderr = String::new();
    for line in BufReader::new(child.stderr.take().expect("piped stderr")).lines() {
        stderr.push_str(&line?);
        stderr.push('\n');
    }
    let status = child.wait()?;
    let external_exit = start.elapsed();
    let internal = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("kata-snap: "))
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(k, v)| Some((k.to_string(), v.strip_suffix(" ms")?.parse().ok()?)))
        .collect();
    Ok(BootTiming {
        external_first_byte,
        external_exit,
        internal,
        status: status.code(),
        stderr,
    })
}

/// Resident memory of a process in KiB: `(total, in mappings of exactly the given sizes)`.
/// Guest RAM is mapped as anonymous regions of the guest's RAM range sizes, so passing those sizes
/// separates guest RAM from the VMM's own memory.
pub fn rss_split(pid: u32, guest_region_kib: &[u64]) -> std::io::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut current_is_guest = false;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(kib)) => {
                current_is_guest = kib
                    .parse()
                    .map(|k: u64| guest_region_kib.contains(&k))
                    .unwrap_or(false);
            }
            (Some("Rss:"), Some(kib)) => {
                let k: u64 = kib.parse().unwrap_or(0);
                total += k;
                if current_is_guest {
                    guest += k;
                }
            }
            _ => {}
        }
    }
    Ok((total, guest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_summarize_median_and_percentiles() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.n, s.median, s.p10, s.p90), (5, 3.0, 1.0, 5.0));
        assert!(summarize(&[]).is_none());
        assert_eq!(summarize(&[7.0]).unwrap().median, 7.0);
    }

    #[test]
    fn test_rss_split_of_self_counts_something() {
        let (total, guest) = rss_split(std::process::id(), &[]).unwrap();
        assert!(total > 0);
        assert_eq!(guest, 0);
    }
}

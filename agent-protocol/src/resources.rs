//! `Update` (runc's `update`) and `Stats` (runc's `events`): the container's
//! cgroup limits in OCI terms, and what the guest's cgroup v2 files report.

use serde::{Deserialize, Serialize};

use crate::validate::{Validate, ValidationError};

/// Largest byte count a memory field may carry (4 PiB): far above any VM,
/// far below the `i64` overflow of `limit + swap` arithmetic.
pub const MAX_MEMORY_BYTES: i64 = 1 << 52;
/// CFS period bounds, microseconds (the kernel's `cpu.max` accepts 1 ms..1 s).
pub const CPU_PERIOD_US: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;
/// Smallest CFS quota, microseconds; the largest is the kernel's 2^44 - 1.
pub const MIN_CPU_QUOTA_US: i64 = 1_000;
/// Largest CFS quota, microseconds (`MAX_BW` of the kernel's scheduler).
pub const MAX_CPU_QUOTA_US: i64 = (1 << 44) - 1;
/// cgroup v1 CPU shares bounds (what runc converts to `cpu.weight`).
pub const CPU_SHARES: std::ops::RangeInclusive<u64> = 2..=262_144;
/// Largest `pids.max` the kernel takes (`PID_MAX_LIMIT`).
pub const MAX_PIDS: i64 = 4 * 1024 * 1024;
/// Longest cpuset list (`cpuset.cpus`, `cpuset.mems`), in bytes.
pub const MAX_CPUSET_LIST: usize = 256;
/// Highest CPU or memory node number a cpuset list may name.
pub const MAX_CPUSET_INDEX: u32 = 4095;
/// Most `memory.stat` entries carried by [`MemoryStats::raw`].
pub const MAX_STAT_ENTRIES: usize = 256;
/// Longest `memory.stat` key, in bytes.
pub const MAX_STAT_KEY: usize = 64;

/// New limits for the container's cgroup (runc's `update`), in OCI
/// `LinuxResources` terms; `None` leaves a limit as it is. The agent does
/// the cgroup v2 conversions as runc's cgroup driver does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in bytes (`memory.max`); -1 is unlimited.
    pub memory_limit: Option<i64>,
    /// Memory reservation in bytes (`memory.low`); -1 is unlimited.
    pub memory_reservation: Option<i64>,
    /// Memory plus swap in bytes, as OCI and cgroup v1 count it;
    /// `memory.swap.max` gets this minus the memory limit. -1 is unlimited.
    pub memory_swap: Option<i64>,
    /// CFS quota in microseconds per period (`cpu.max`); -1 is unlimited.
    pub cpu_quota: Option<i64>,
    /// CFS period in microseconds (`cpu.max`).
    pub cpu_period: Option<u64>,
    /// cgroup v1 shares, converted to `cpu.weight` as runc does.
    pub cpu_shares: Option<u64>,
    /// CPUs the container may run on (`cpuset.cpus`), e.g. `0-1,3`.
    pub cpuset_cpus: Option<String>,
    /// Memory nodes (`cpuset.mems`), e.g. `0`.
    pub cpuset_mems: Option<String>,
    /// Most processes (`pids.max`); -1 is unlimited.
    pub pids_limit: Option<i64>,
}

impl Resources {
    /// Whether the update changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What the container's cgroup reports (runc's `events --stats` on cgroup
/// v2). A limit of `u64::MAX` means unlimited (`max`), as runc prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    /// `cpu.stat`.
    pub cpu: CpuStats,
    /// `memory.current`, `memory.max`, `memory.swap.*`, `memory.stat`,
    /// `memory.events`.
    pub memory: MemoryStats,
    /// `pids.current`, `pids.max`.
    pub pids: PidsStats,
}

/// `cpu.stat`, in microseconds as the file has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuStats {
    /// `usage_usec`.
    pub usage_usec: u64,
    /// `user_usec`.
    pub user_usec: u64,
    /// `system_usec`.
    pub system_usec: u64,
    /// `nr_periods` (0 without a CFS quota).
    pub nr_periods: u64,
    /// `nr_throttled`.
    pub nr_throttled: u64,
    /// `throttled_usec`.
    pub throttled_usec: u64,
}

/// The memory controller's files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// `memory.current`, bytes.
    pub usage: u64,
    /// `memory.max`, bytes (`u64::MAX`: max).
    pub limit: u64,
    /// `memory.swap.current`, bytes (0 without swap accounting).
    pub swap_usage: u64,
    /// `memory.swap.max`, bytes (`u64::MAX`: max; 0 without swap accounting).
    pub swap_limit: u64,
    /// `memory.stat`, every `key value` line in file order.
    pub raw: Vec<(String, u64)>,
    /// `memory.events`.
    pub events: MemoryEvents,
}

/// `memory.events` counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEvents {
    /// `low`.
    pub low: u64,
    /// `high`.
    pub high: u64,
    /// `max`: times usage was about to go over `memory.max`.
    pub max: u64,
    /// `oom`: times the OOM state was reached.
    pub oom: u64,
    /// `oom_kill`: processes the OOM killer killed.
    pub oom_kill: u64,
}

/// The pids controller's files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidsStats {
    /// `pids.current`.
    pub current: u64,
    /// `pids.max` (`u64::MAX`: max).
    pub limit: u64,
}

fn bytes(field: &'static str, v: Option<i64>) -> Result<(), ValidationError> {
    match v {
        None | Some(-1) => Ok(()),
        Some(b) if (1..=MAX_MEMORY_BYTES).contains(&b) => Ok(()),
        Some(b) => Err(ValidationError::OutOfRange {
            field,
            value: b.to_string(),
            allowed: format!("-1 (unlimited) or 1..={MAX_MEMORY_BYTES}"),
        }),
    }
}

/// Checks a cpuset list such as `0-3,5`: comma-separated numbers or
/// ascending ranges, each at most [`MAX_CPUSET_INDEX`].
pub fn validate_cpuset_list(field: &'static str, s: &str) -> Result<(), ValidationError> {
    let bad = || ValidationError::BadCpuset {
        field,
        value: s.chars().take(MAX_CPUSET_LIST).collect(),
    };
    if s.is_empty() || s.len() > MAX_CPUSET_LIST {
        return Err(bad());
    }
    let num = |t: &str| -> Result<u32, ValidationError> {
        if t.is_empty() || t.len() > 4 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse::<u32>()
            .ok()
            .filter(|&n| n <= MAX_CPUSET_INDEX)
            .ok_or_else(bad)
    };
    for item in s.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                if num(a)? > num(b)? {
                    return Err(bad());
                }
            }
            None => {
                num(item)?;
            }
        }
    }
    Ok(())
}

impl Validate for Resources {
    fn validate(&self) -> Result<(), ValidationError> {
        bytes("memory limit", self.memory_limit)?;
        bytes("memory reservation", self.memory_reservation)?;
        bytes("memory+swap limit", self.memory_swap)?;
        if let (Some(m), Some(s)) = (self.memory_limit, self.memory_swap)
            && m > 0
            && s > 0
            && s < m
        {
            return Err(ValidationError::OutOfRange {
                field: "memory+swap limit",
                value: s.to_string(),
                allowed: format!("at least the memory limit {m}, or -1"),
            });
        }
        match self.cpu_quota {
            None | Some(-1) => {}
            Some(q) if (MIN_CPU_QUOTA_US..=MAX_CPU_QUOTA_US).contains(&q) => {}
            Some(q) => {
                return Err(ValidationError::OutOfRange {
                    field: "cpu quota",
                    value: q.to_string(),
                    allowed: format!(
                        "-1 (unlimited) or {MIN_CPU_QUOTA_US}..={MAX_CPU_QUOTA_US} µs"
                    ),
                });
            }
        }
        if let Some(p) = self.cpu_period
            && !CPU_PERIOD_US.contains(&p)
        {
            return Err(ValidationError::OutOfRange {
                field: "cpu period",
                value: p.to_string(),
                allowed: format!("{}..={} µs", CPU_PERIOD_US.start(), CPU_PERIOD_US.end()),
            });
        }
        if let Some(s) = self.cpu_shares
            && !CPU_SHARES.contains(&s)
        {
            return Err(ValidationError::OutOfRange {
                field: "cpu shares",
                value: s.to_string(),
                allowed: format!("{}..={}", CPU_SHARES.start(), CPU_SHARES.end()),
            });
        }
        if let Some(c) = &self.cpuset_cpus {
            validate_cpuset_list("cpuset cpus", c)?;
        }
        if let Some(m) = &self.cpuset_mems {
            validate_cpuset_list("cpuset mems", m)?;
        }
        match self.pids_limit {
            None | Some(-1) => Ok(()),
            Some(p) if (1..=MAX_PIDS).contains(&p) => Ok(()),
            Some(p) => Err(ValidationError::OutOfRange {
                field: "pids limit",
                value: p.to_string(),
                allowed: format!("-1 (unlimited) or 1..={MAX_PIDS}"),
            }),
        }
    }
}

impl Validate for ContainerStats {
    fn validate(&self) -> Result<(), ValidationError> {
        let raw = &self.memory.raw;
        if raw.len() > MAX_STAT_ENTRIES {
            return Err(ValidationError::TooMany {
                field: "memory.stat entries",
                len: raw.len(),
                max: MAX_STAT_ENTRIES,
            });
        }
        for (k, _) in raw {
            if !valid_stat_key(k) {
                return Err(ValidationError::BadStatKey(
                    k.chars().take(MAX_STAT_KEY).collect(),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `k` can be a `memory.stat` key: 1..=64 bytes of lower-case
/// letters, digits and `_`.
pub fn valid_stat_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_STAT_KEY
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(r: Resources) {
        r.validate()
            .unwrap_or_else(|e| panic!("{r:?} refused: {e}"));
    }

    fn refused(r: Resources) -> String {
        match r.validate() {
            Err(e) => e.to_string(),
            Ok(()) => panic!("{r:?} accepted"),
        }
    }

    #[test]
    fn test_resources_valid_values_accepted() {
        ok(Resources::default());
        ok(Resources {
            memory_limit: Some(64 << 20),
            memory_reservation: Some(-1),
            memory_swap: Some(128 << 20),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            cpu_shares: Some(1024),
            cpuset_cpus: Some("0-1,3".into()),
            cpuset_mems: Some("0".into()),
            pids_limit: Some(20),
        });
        ok(Resources {
            memory_limit: Some(-1),
            memory_swap: Some(-1),
            cpu_quota: Some(-1),
            pids_limit: Some(-1),
            ..Default::default()
        });
    }

    #[test]
    fn test_resources_out_of_bounds_refused() {
        let m = refused(Resources {
            memory_limit: Some(0),
            ..Default::default()
        });
        assert!(m.contains("memory limit"), "{m}");
        refused(Resources {
            memory_limit: Some(-2),
            ..Default::default()
        });
        refused(Resources {
            memory_reservation: Some(MAX_MEMORY_BYTES + 1),
            ..Default::default()
        });
        let m = refused(Resources {
            memory_limit: Some(64 << 20),
            memory_swap: Some(32 << 20),
            ..Default::default()
        });
        assert!(m.contains("at least the memory limit"), "{m}");
        for q in [0, 999, -5, MAX_CPU_QUOTA_US + 1] {
            refused(Resources {
                cpu_quota: Some(q),
                ..Default::default()
            });
        }
        for p in [0, 999, 1_000_001] {
            refused(Resources {
                cpu_period: Some(p),
                ..Default::default()
            });
        }
        for s in [0, 1, 262_145] {
            refused(Resources {
                cpu_shares: Some(s),
                ..Default::default()
            });
        }
        for p in [0, -2, MAX_PIDS + 1] {
            refused(Resources {
                pids_limit: Some(p),
                ..Default::default()
            });
        }
    }

    #[test]
    fn test_cpuset_lists_checked() {
        for good in ["0", "0-1", "0,2-3,7", "4095"] {
            validate_cpuset_list("c", good).unwrap();
        }
        let long = "1,".repeat(200);
        for bad in [
            "", "-", "1-", "-1", "3-1", "a", "0 1", "4096", "1,,2", "0x1", "99999", &long,
        ] {
            assert!(validate_cpuset_list("c", bad).is_err(), "{bad:?} accepted");
        }
        let m = refused(Resources {
            cpuset_cpus: Some("1;reboot".into()),
            ..Default::default()
        });
        assert!(m.contains("cpuset cpus"), "{m}");
    }

    #[test]
    fn test_update_and_stats_round_trip_and_are_validated_on_send() {
        use crate::{AgentMessage, HostMessage, decode_message, encode_message};
        let up = HostMessage::Update(Box::new(Resources {
            memory_limit: Some(64 << 20),
            pids_limit: Some(20),
            ..Default::default()
        }));
        let f = encode_message(&up).unwrap();
        assert_eq!(decode_message::<HostMessage>(&f[4..]).unwrap(), up);
        let f = encode_message(&HostMessage::Stats).unwrap();
        assert_eq!(
            decode_message::<HostMessage>(&f[4..]).unwrap(),
            HostMessage::Stats
        );
        let mut stats = ContainerStats::default();
        stats.memory.limit = u64::MAX;
        stats.memory.raw = vec![("anon".into(), 4096)];
        let st = AgentMessage::Stats(Box::new(stats));
        let f = encode_message(&st).unwrap();
        assert_eq!(decode_message::<AgentMessage>(&f[4..]).unwrap(), st);
        let bad = HostMessage::Update(Box::new(Resources {
            pids_limit: Some(0),
            ..Default::default()
        }));
        assert!(encode_message(&bad).is_err());
    }

    #[test]
    fn test_stats_keys_and_count_bounded() {
        let mut s = ContainerStats::default();
        s.memory.raw.push(("anon".into(), 1));
        s.validate().unwrap();
        s.memory.raw.push(("Bad Key".into(), 1));
        assert!(s.validate().is_err());
        s.memory.raw = (0..=MAX_STAT_ENTRIES)
            .map(|i| (format!("k{i}"), 0))
            .collect();
        assert!(s.validate().is_err());
        assert!(!valid_stat_key(&"a".repeat(MAX_STAT_KEY + 1)));
    }
}

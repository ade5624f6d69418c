//! `linux.resources` to the size of the VM.
//!
//! In a VM the memory and CPU limits of a container are the VM's size, not a
//! cgroup: a container that may use 512 MiB gets a VM with 512 MiB for
//! itself plus what the guest kernel and agent need.

use oci_spec::runtime::LinuxResources;

use crate::error::ConfigError;

/// Memory added to the container's limit for the guest itself: the kernel's
/// static footprint and page tables (about 20 MiB for the microVM config),
/// the agent (a few MiB) and slack so that the container, not the guest,
/// meets the limit first.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// Smallest VM: below this the guest kernel and agent leave too little.
pub const MIN_MEM_MIB: u64 = 128;
/// Largest VM: what the host's templates are built for. A limit that would
/// need more is refused, never silently shrunk.
pub const MAX_MEM_MIB: u64 = 16384;
/// Most vCPUs: beyond this a one-container VM gains little and every vCPU
/// adds to restore time. More CPUs asked for are clamped (a performance
/// bound, not a correctness one) and the clamp is recorded in `ignored`.
pub const MAX_VCPUS: u8 = 8;
/// CFS period assumed when a quota comes without one (the kernel default).
const DEFAULT_CFS_PERIOD_US: u64 = 100_000;
/// Highest CPU number accepted in a cpuset (`NR_CPUS` of large kernels).
const MAX_CPU_INDEX: u32 = 8191;

/// What the VM should be sized to; `None` leaves the runtime's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Guest memory in MiB, in `MIN_MEM_MIB..=MAX_MEM_MIB`.
    pub mem_mib: Option<u64>,
    /// vCPUs, in `1..=MAX_VCPUS`.
    pub vcpus: Option<u8>,
}

/// VM memory for a container memory limit in bytes: the limit rounded up to
/// MiB plus [`GUEST_OVERHEAD_MIB`], at least [`MIN_MEM_MIB`]. `None` for no
/// limit (0 or negative, as runc reads -1).
pub fn memory_mib(limit: i64) -> Result<Option<u64>, ConfigError> {
    if limit <= 0 {
        return Ok(None);
    }
    let mib = (limit as u64).div_ceil(1 << 20) + GUEST_OVERHEAD_MIB;
    if mib > MAX_MEM_MIB {
        return Err(ConfigError::MemoryTooLarge {
            limit,
            max_mib: MAX_MEM_MIB - GUEST_OVERHEAD_MIB,
        });
    }
    Ok(Some(mib.max(MIN_MEM_MIB)))
}

/// Number of CPUs in a cpuset list such as `0-3,6` (duplicates counted once).
/// `None` for an empty list.
pub fn count_cpus(list: &str) -> Result<Option<u32>, ConfigError> {
    let bad = || ConfigError::BadCpuList(list.chars().take(64).collect());
    let list = list.trim();
    if list.is_empty() {
        return Ok(None);
    }
    let num = |s: &str| -> Result<u32, ConfigError> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match s.parse::<u32>() {
            Ok(n) if n <= MAX_CPU_INDEX => Ok(n),
            _ => Err(bad()),
        }
    };
    let mut ranges = Vec::new();
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        ranges.push((lo, hi));
    }
    ranges.sort_unstable();
    let mut count = 0u32;
    let mut next = 0u32; // first CPU not yet counted
    for (lo, hi) in ranges {
        let lo = lo.max(next);
        if hi >= lo {
            count += hi - lo + 1;
            next = hi + 1;
        }
    }
    Ok(Some(count))
}

/// vCPUs for a CFS quota and period: `ceil(quota / period)`. `None` for no
/// quota (0 or negative, as runc reads -1).
pub fn quota_cpus(quota: i64, period: Option<u64>) -> Option<u64> {
    if quota <= 0 {
        return None;
    }
    let period = period.filter(|&p| p > 0).unwrap_or(DEFAULT_CFS_PERIOD_US);
    Some((quota as u64).div_ceil(period))
}

/// Sizes the VM from `linux.resources`. When both a quota and a cpuset are
/// given the smaller count wins: the container could never use more.
/// Other resource settings are recorded in `ignored`.
pub fn from_oci(r: &LinuxResources, ignored: &mut Vec<String>) -> Result<Resources, ConfigError> {
    let mut out = Resources::default();
    if let Some(m) = r.memory() {
        if let Some(limit) = m.limit() {
            out.mem_mib = memory_mib(limit)?;
        }
        let other = [
            ("reservation", m.reservation().is_some()),
            ("swap", m.swap().is_some()),
            ("kernel", m.kernel().is_some()),
            ("kernelTCP", m.kernel_tcp().is_some()),
            ("swappiness", m.swappiness().is_some()),
            ("disableOOMKiller", m.disable_oom_killer().is_some()),
        ];
        for (name, set) in other {
            if set {
                ignored.push(format!(
                    "linux.resources.memory.{name}: the VM's memory is the only limit"
                ));
            }
        }
    }
    if let Some(c) = r.cpu() {
        let by_quota = c.quota().and_then(|q| quota_cpus(q, c.period()));
        let by_set = match c.cpus() {
            Some(list) => count_cpus(list)?.map(u64::from),
            None => None,
        };
        let want = match (by_quota, by_set) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(want) = want {
            let vcpus = want.clamp(1, u64::from(MAX_VCPUS)) as u8;
            if want > u64::from(vcpus) {
                ignored.push(format!(
                    "linux.resources.cpu: {want} CPUs asked for, the VM gets {vcpus} (the most)"
                ));
            }
            out.vcpus = Some(vcpus);
        }
        let other = [
            ("shares", c.shares().is_some()),
            ("realtimeRuntime", c.realtime_runtime().is_some()),
            ("realtimePeriod", c.realtime_period().is_some()),
            ("mems", c.mems().is_some()),
            ("idle", c.idle().is_some()),
            ("burst", c.burst().is_some()),
        ];
        for (name, set) in other {
            if set {
                ignored.push(format!(
                    "linux.resources.cpu.{name}: the VM's vCPUs are the only limit"
                ));
            }
        }
    }
    let other = [
        ("devices", r.devices().is_some()),
        ("pids", r.pids().is_some()),
        ("blockIO", r.block_io().is_some()),
        ("hugepageLimits", r.hugepage_limits().is_some()),
        ("network", r.network().is_some()),
        ("rdma", r.rdma().is_some()),
        ("unified", r.unified().is_some()),
    ];
    for (name, set) in other {
        if set {
            ignored.push(format!(
                "linux.resources.{name}: no host cgroup is made for a VM's container"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_memory_mib_rounds_up_and_adds_overhead() {
        assert_eq!(memory_mib(512 << 20).unwrap(), Some(512 + 64));
        assert_eq!(memory_mib((512 << 20) + 1).unwrap(), Some(513 + 64));
        assert_eq!(memory_mib(1).unwrap(), Some(MIN_MEM_MIB));
        assert_eq!(memory_mib(64 << 20).unwrap(), Some(MIN_MEM_MIB));
        assert_eq!(memory_mib(100 << 20).unwrap(), Some(164));
    }

    #[test]
    fn test_memory_mib_unlimited_is_none() {
        assert_eq!(memory_mib(-1).unwrap(), None);
        assert_eq!(memory_mib(0).unwrap(), None);
        assert_eq!(memory_mib(i64::MIN).unwrap(), None);
    }

    #[test]
    fn test_memory_mib_above_max_refused() {
        let max_limit = ((MAX_MEM_MIB - GUEST_OVERHEAD_MIB) << 20) as i64;
        assert_eq!(memory_mib(max_limit).unwrap(), Some(MAX_MEM_MIB));
        let e = memory_mib(max_limit + 1).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::MemoryTooLarge { max_mib: 16320, .. }
        ));
        assert!(e.to_string().contains("16320 MiB"), "{e}");
        assert!(memory_mib(i64::MAX).is_err());
    }

    #[test]
    fn test_count_cpus_lists() {
        assert_eq!(count_cpus("0-3,6").unwrap(), Some(5));
        assert_eq!(count_cpus("0").unwrap(), Some(1));
        assert_eq!(count_cpus(" 2 , 4-5 ").unwrap(), Some(3));
        assert_eq!(count_cpus("0-3,2-5,5").unwrap(), Some(6));
        assert_eq!(count_cpus("0-8191").unwrap(), Some(8192));
        assert_eq!(count_cpus("").unwrap(), None);
    }

    #[test]
    fn test_count_cpus_garbage_refused() {
        for bad in [
            "a", "1-", "-1", "3-1", "1,,2", "0-99999", "+1", "1 2", "0x1",
        ] {
            assert!(
                matches!(count_cpus(bad), Err(ConfigError::BadCpuList(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn test_quota_cpus_rounds_up() {
        assert_eq!(quota_cpus(150_000, Some(100_000)), Some(2));
        assert_eq!(quota_cpus(100_000, Some(100_000)), Some(1));
        assert_eq!(quota_cpus(1, Some(100_000)), Some(1));
        assert_eq!(quota_cpus(50_000, None), Some(1));
        assert_eq!(quota_cpus(400_000, Some(0)), Some(4));
        assert_eq!(quota_cpus(-1, Some(100_000)), None);
        assert_eq!(quota_cpus(0, None), None);
        assert_eq!(quota_cpus(i64::MAX, Some(1)), Some(i64::MAX as u64));
    }

    fn resources(json: &str) -> (Result<Resources, ConfigError>, Vec<String>) {
        let r: LinuxResources = serde_json::from_str(json).unwrap();
        let mut ignored = Vec::new();
        (from_oci(&r, &mut ignored), ignored)
    }

    #[test]
    fn test_from_oci_quota_and_cpuset_smaller_wins() {
        let (r, _) = resources(r#"{"cpu":{"quota":350000,"period":100000,"cpus":"0-1"}}"#);
        assert_eq!(r.unwrap().vcpus, Some(2));
        let (r, _) = resources(r#"{"cpu":{"quota":150000,"period":100000,"cpus":"0-7"}}"#);
        assert_eq!(r.unwrap().vcpus, Some(2));
    }

    #[test]
    fn test_from_oci_many_cpus_clamped_and_recorded() {
        let (r, ignored) = resources(r#"{"cpu":{"cpus":"0-63"}}"#);
        assert_eq!(r.unwrap().vcpus, Some(MAX_VCPUS));
        assert!(ignored.iter().any(|i| i.contains("64 CPUs")), "{ignored:?}");
        let (r, _) = resources(&format!(r#"{{"cpu":{{"quota":{},"period":1}}}}"#, i64::MAX));
        assert_eq!(r.unwrap().vcpus, Some(MAX_VCPUS));
    }

    #[test]
    fn test_from_oci_nothing_given_is_none() {
        let (r, ignored) = resources(r#"{"devices":[{"allow":false,"access":"rwm"}]}"#);
        assert_eq!(r.unwrap(), Resources::default());
        assert_eq!(ignored.len(), 1);
        let (r, _) = resources(r#"{"memory":{"limit":-1},"cpu":{"quota":-1,"shares":1024}}"#);
        assert_eq!(r.unwrap(), Resources::default());
    }
}

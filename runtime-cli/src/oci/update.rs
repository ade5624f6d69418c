//! runc's `update` and `events`, and `checkpoint` refused.
//!
//! Both talk to the container's agent as `exec` does: a connection of their own through the VM's
//! vsock socket (`ROOT/ID/v.sock`, `CONNECT 1024`), `Hello`, then `Update` (the limits go to the
//! container's cgroup v2 group in the guest) or `Stats` (its files, printed in runc's
//! `types.Event` shape). See docs/runtime.md.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{ClientError, ContainerStats, Resources, Validate};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::GlobalOpts;
use super::state::{Status, Store};

/// Largest `--resources` document read.
const MAX_RESOURCES_JSON: u64 = 1 << 20;
/// How often `events` looks for an OOM kill between stats.
const OOM_POLL: Duration = Duration::from_millis(500);

/// `update` flags, as runc's (sizes as runc takes them: `100M`, `1.5g`, `-1`).
#[derive(Debug, Clone, Default, Args)]
pub struct UpdateArgs {
    /// runc's JSON resources (an OCI LinuxResources) from FILE, or `-` for stdin; the other
    /// flags are then ignored.
    #[arg(long, short = 'r', value_name = "FILE")]
    pub resources: Option<String>,
    /// Accepted and ignored with a warning: the VM's disk is the container's alone.
    #[arg(long, value_name = "WEIGHT")]
    pub blkio_weight: Option<String>,
    /// CPU CFS period (µs).
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_period: Option<String>,
    /// CPU CFS quota (µs per period; -1 unlimited).
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_quota: Option<String>,
    /// CPU shares (converted to cgroup v2's cpu.weight as runc does).
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_share: Option<String>,
    /// Refused: cgroup v2 has no realtime CPU limits.
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_rt_period: Option<String>,
    /// Refused: cgroup v2 has no realtime CPU limits.
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_rt_runtime: Option<String>,
    /// CPUs the container may use (in the VM: 0..vCPUs-1).
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes (the VM has node 0).
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Ignored with runc's warning (obsolete in runc too).
    #[arg(long, hide = true, allow_hyphen_values = true)]
    pub kernel_memory: Option<String>,
    /// Ignored with runc's warning (obsolete in runc too).
    #[arg(long, hide = true, allow_hyphen_values = true)]
    pub kernel_memory_tcp: Option<String>,
    /// Memory limit (bytes, or 100M...; -1 unlimited), at most the VM's memory.
    #[arg(long, allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory reservation (cgroup v2 memory.low).
    #[arg(long, allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// Memory plus swap; -1 unlimited swap.
    #[arg(long, allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// Most processes in the container (-1 unlimited).
    #[arg(long, allow_hyphen_values = true)]
    pub pids_limit: Option<String>,
    /// Refused with runc's text: the guest has no Intel RDT.
    #[arg(long)]
    pub l3_cache_schema: Option<String>,
    /// Refused with runc's text: the guest has no Intel RDT.
    #[arg(long)]
    pub mem_bw_schema: Option<String>,
    /// The container id.
    pub id: String,
}

/// `events` flags, as runc's.
#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    /// Time between stats events (Go duration: 5s, 500ms, 1m30s).
    #[arg(long, default_value = "5s", value_parser = parse_go_duration)]
    pub interval: Duration,
    /// Print the container's stats once and exit.
    #[arg(long)]
    pub stats: bool,
    /// The container id.
    pub id: String,
}

/// `checkpoint`: every argument is taken, and the command refused.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// runc's flags and the container id.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// The one line `checkpoint` answers.
pub const CHECKPOINT_UNSUPPORTED: &str =
    "checkpoint/restore is not supported by kata-snap (VM snapshots are not CRIU images)";

fn warn(msg: &str) {
    eprintln!(
        "time=\"{}\" level=warning msg={}",
        super::state::rfc3339_now(),
        serde_json::to_string(msg).unwrap_or_default()
    );
}

/// docker/go-units `RAMInBytes`: a number with an optional fraction, an optional space, and an
/// optional binary unit (k, m, g, t, p; `i` and `b` suffixes allowed), e.g. `100M`, `1.5g`, `64MiB`.
pub fn ram_in_bytes(s: &str) -> Result<i64> {
    let invalid = || anyhow!("invalid size: '{s}'");
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, rest) = s.split_at(num_end);
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.contains("..") {
        return Err(invalid());
    }
    let mut unit = rest.chars();
    let mult: f64 = match unit.clone().next().map(|c| c.to_ascii_lowercase()) {
        Some(c @ ('k' | 'm' | 'g' | 't' | 'p')) => {
            unit.next();
            1024f64.powi("kmgtp".find(c).unwrap_or(0) as i32 + 1)
        }
        _ => 1.0,
    };
    let tail: String = unit.collect::<String>().to_ascii_lowercase();
    if !matches!(tail.as_str(), "" | "b" | "i" | "ib") {
        return Err(invalid());
    }
    let value: f64 = num.parse().map_err(|_| invalid())?;
    let bytes = value * mult;
    if !bytes.is_finite() || bytes >= i64::MAX as f64 {
        return Err(invalid());
    }
    Ok(bytes as i64)
}

fn memory_flag(name: &str, v: &str) -> Result<i64> {
    if v == "-1" {
        return Ok(-1);
    }
    ram_in_bytes(v).map_err(|e| anyhow!("invalid value for {name}: {e}"))
}

fn uint_flag(name: &str, v: &str) -> Result<u64> {
    v.parse::<u64>().map_err(|_| {
        anyhow!("invalid value for {name}: strconv.ParseUint: parsing {v:?}: invalid syntax")
    })
}

fn int_flag(name: &str, v: &str) -> Result<i64> {
    v.parse::<i64>().map_err(|_| {
        anyhow!("invalid value for {name}: strconv.ParseInt: parsing {v:?}: invalid syntax")
    })
}

/// runc: zero means "leave as it is".
fn nonzero<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

/// A negative quota is unlimited (runc writes `max` for any quota <= 0 it is given).
fn quota(q: i64) -> Option<i64> {
    match q {
        0 => None,
        q if q < 0 => Some(-1),
        q => Some(q),
    }
}

/// runc's `--resources` document: an OCI `LinuxResources`; unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonResources {
    memory: Option<JsonMemory>,
    cpu: Option<JsonCpu>,
    block_io: Option<JsonBlockIo>,
    pids: Option<JsonPids>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonMemory {
    limit: Option<i64>,
    reservation: Option<i64>,
    swap: Option<i64>,
    kernel: Option<i64>,
    #[serde(rename = "kernelTCP")]
    kernel_tcp: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonCpu {
    shares: Option<u64>,
    quota: Option<i64>,
    period: Option<u64>,
    realtime_runtime: Option<i64>,
    realtime_period: Option<u64>,
    cpus: Option<String>,
    mems: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct JsonBlockIo {
    weight: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
struct JsonPids {
    limit: Option<i64>,
}

const RT_REFUSED: &str = "realtime CPU limits (--cpu-rt-period, --cpu-rt-runtime) are not \
                          supported: the guest's cgroup v2 has none";

/// The resources `update` asks for: from `-r` (read through `stdin` for `-`), else the flags.
/// Warnings for what is ignored go to stderr.
pub fn resources(args: &UpdateArgs, stdin: &mut dyn Read) -> Result<Resources> {
    if let Some(src) = &args.resources {
        return from_json(src, stdin);
    }
    if args.l3_cache_schema.is_some() {
        bail!("Intel RDT/CAT: l3 cache schema is not enabled");
    }
    if args.mem_bw_schema.is_some() {
        bail!("Intel RDT/MBA: memory bandwidth schema is not enabled");
    }
    let mut r = Resources::default();
    if let Some(v) = &args.cpu_period {
        r.cpu_period = nonzero(uint_flag("cpu-period", v)?);
    }
    if let Some(v) = &args.cpu_share {
        r.cpu_shares = nonzero(uint_flag("cpu-share", v)?);
    }
    if let Some(v) = &args.cpu_quota {
        r.cpu_quota = quota(int_flag("cpu-quota", v)?);
    }
    let rt_period = args
        .cpu_rt_period
        .as_deref()
        .map(|v| uint_flag("cpu-rt-period", v));
    let rt_runtime = args
        .cpu_rt_runtime
        .as_deref()
        .map(|v| int_flag("cpu-rt-runtime", v));
    if rt_period.transpose()?.unwrap_or(0) != 0 || rt_runtime.transpose()?.unwrap_or(0) != 0 {
        bail!(RT_REFUSED);
    }
    r.cpuset_cpus = args.cpuset_cpus.clone().filter(|s| !s.is_empty());
    r.cpuset_mems = args.cpuset_mems.clone().filter(|s| !s.is_empty());
    for (name, val, dest) in [
        ("memory", &args.memory, &mut r.memory_limit),
        ("memory-swap", &args.memory_swap, &mut r.memory_swap),
        (
            "memory-reservation",
            &args.memory_reservation,
            &mut r.memory_reservation,
        ),
    ] {
        if let Some(v) = val {
            *dest = nonzero(memory_flag(name, v)?);
        }
    }
    for (name, val) in [
        ("kernel-memory", &args.kernel_memory),
        ("kernel-memory-tcp", &args.kernel_memory_tcp),
    ] {
        if val.as_deref().is_some_and(|v| !v.is_empty()) {
            warn(&format!("Setting --{name} is ignored and will be removed"));
        }
    }
    if let Some(v) = &args.blkio_weight
        && int_flag("blkio-weight", v)? != 0
    {
        warn("Setting --blkio-weight is ignored: the container's VM has its disk to itself");
    }
    if let Some(v) = &args.pids_limit {
        r.pids_limit = nonzero(int_flag("pids-limit", v)?);
    }
    Ok(r)
}

fn from_json(src: &str, stdin: &mut dyn Read) -> Result<Resources> {
    let mut text = Vec::new();
    if src == "-" {
        stdin
            .take(MAX_RESOURCES_JSON + 1)
            .read_to_end(&mut text)
            .context("cannot read the resources from stdin")?;
    } else {
        let s = super::read_small_file(Path::new(src), MAX_RESOURCES_JSON)?;
        text = s.into_bytes();
    }
    if text.len() as u64 > MAX_RESOURCES_JSON {
        bail!("the resources are larger than {MAX_RESOURCES_JSON} bytes");
    }
    let j: JsonResources =
        serde_json::from_slice(&text).context("cannot parse the resources JSON")?;
    let mut r = Resources::default();
    if let Some(m) = j.memory {
        r.memory_limit = m.limit.and_then(nonzero);
        r.memory_reservation = m.reservation.and_then(nonzero);
        r.memory_swap = m.swap.and_then(nonzero);
        if m.kernel.unwrap_or(0) != 0 || m.kernel_tcp.unwrap_or(0) != 0 {
            warn("Setting memory.kernel and memory.kernelTCP is ignored and will be removed");
        }
    }
    if let Some(c) = j.cpu {
        r.cpu_shares = c.shares.and_then(nonzero);
        r.cpu_quota = c.quota.and_then(quota);
        r.cpu_period = c.period.and_then(nonzero);
        if c.realtime_runtime.unwrap_or(0) != 0 || c.realtime_period.unwrap_or(0) != 0 {
            bail!(RT_REFUSED);
        }
        r.cpuset_cpus = c.cpus.filter(|s| !s.is_empty());
        r.cpuset_mems = c.mems.filter(|s| !s.is_empty());
    }
    if j.block_io.and_then(|b| b.weight).unwrap_or(0) != 0 {
        warn("Setting blockIO.weight is ignored: the container's VM has its disk to itself");
    }
    r.pids_limit = j.pids.and_then(|p| p.limit).and_then(nonzero);
    Ok(r)
}

/// Go's `time.ParseDuration` for what `--interval` takes: `300ms`, `5s`, `1m30s`, `1.5h`.
pub fn parse_go_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("time: invalid duration {s:?}");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[u..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// The agent's refusal as one line (its text is runc's where runc has one).
pub(super) fn agent_error(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Agent { message, .. } => anyhow!(message),
        e => anyhow!(e),
    }
}

/// Loads the container and checks it runs (runc: `container not running` when stopped).
fn running(
    g: &GlobalOpts,
    id: &str,
    stopped: impl FnOnce() -> String,
) -> Result<std::path::PathBuf> {
    let store = Store::lookup(g.root());
    let record = store.load(id)?;
    match record.current_status() {
        Status::Stopped => bail!(stopped()),
        Status::Paused => bail!("container {id} is paused: its VM cannot answer (resume it first)"),
        _ => Ok(store.dir(id)),
    }
}

/// `kata-snap update`.
pub fn update(g: &GlobalOpts, args: UpdateArgs) -> Result<()> {
    let dir = running(g, &args.id, || "container not running".into())?;
    let r = resources(&args, &mut std::io::stdin().lock())?;
    r.validate().context("invalid resources")?;
    super::exec::connect(&dir)?.update(r).map_err(agent_error)
}

/// runc's `types.Event`.
#[derive(Debug, Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Stats>,
}

fn zero(v: &u64) -> bool {
    *v == 0
}

/// runc 1.1.5's `types.Stats`, as its cgroup v2 driver fills it.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    cpu: Cpu,
    cpuset: CpuSet,
    memory: Memory,
    pids: Pids,
    blkio: Empty,
    hugetlb: Empty,
    intel_rdt: Empty,
    network_interfaces: Option<()>,
}

#[derive(Debug, Default, Serialize)]
struct Empty {}

#[derive(Debug, Default, Serialize)]
struct Cpu {
    usage: CpuUsage,
    throttling: Throttling,
}

#[derive(Debug, Default, Serialize)]
struct CpuUsage {
    #[serde(skip_serializing_if = "zero")]
    total: u64,
    kernel: u64,
    user: u64,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Throttling {
    #[serde(skip_serializing_if = "zero")]
    periods: u64,
    #[serde(skip_serializing_if = "zero")]
    throttled_periods: u64,
    #[serde(skip_serializing_if = "zero")]
    throttled_time: u64,
}

#[derive(Debug, Default, Serialize)]
struct CpuSet {
    cpu_exclusive: u64,
    mem_hardwall: u64,
    mem_exclusive: u64,
    memory_migrate: u64,
    memory_spread_page: u64,
    memory_spread_slab: u64,
    memory_pressure: u64,
    sched_load_balance: u64,
    sched_relax_domain_level: i64,
}

#[derive(Debug, Default, Serialize)]
struct MemoryEntry {
    limit: u64,
    #[serde(skip_serializing_if = "zero")]
    usage: u64,
    #[serde(skip_serializing_if = "zero")]
    max: u64,
    failcnt: u64,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Memory {
    #[serde(skip_serializing_if = "zero")]
    cache: u64,
    usage: MemoryEntry,
    swap: MemoryEntry,
    kernel: MemoryEntry,
    #[serde(rename = "kernelTCP")]
    kernel_tcp: MemoryEntry,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    raw: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize)]
struct Pids {
    #[serde(skip_serializing_if = "zero")]
    current: u64,
    #[serde(skip_serializing_if = "zero")]
    limit: u64,
}

impl From<&ContainerStats> for Stats {
    /// As runc's cgroup v2 driver: nanoseconds from cpu.stat's µs; swap reported as memory +
    /// swap (cgroup v1's view); `pids.max` = max shown as no limit (0); cache = memory.stat's
    /// `file`.
    fn from(s: &ContainerStats) -> Self {
        let m = &s.memory;
        let swap_limit = if m.swap_limit == u64::MAX {
            u64::MAX
        } else {
            m.swap_limit.saturating_add(m.limit)
        };
        let raw: std::collections::BTreeMap<String, u64> = m.raw.iter().cloned().collect();
        Stats {
            cpu: Cpu {
                usage: CpuUsage {
                    total: s.cpu.usage_usec.saturating_mul(1000),
                    kernel: s.cpu.system_usec.saturating_mul(1000),
                    user: s.cpu.user_usec.saturating_mul(1000),
                },
                throttling: Throttling {
                    periods: s.cpu.nr_periods,
                    throttled_periods: s.cpu.nr_throttled,
                    throttled_time: s.cpu.throttled_usec.saturating_mul(1000),
                },
            },
            memory: Memory {
                cache: raw.get("file").copied().unwrap_or(0),
                usage: MemoryEntry {
                    limit: m.limit,
                    usage: m.usage,
                    ..Default::default()
                },
                swap: MemoryEntry {
                    limit: swap_limit,
                    usage: m.swap_usage.saturating_add(m.usage),
                    ..Default::default()
                },
                raw,
                ..Default::default()
            },
            pids: Pids {
                current: s.pids.current,
                limit: if s.pids.limit == u64::MAX {
                    0
                } else {
                    s.pids.limit
                },
            },
            ..Default::default()
        }
    }
}

/// One event as runc prints it: a JSON object on a line.
pub fn event_line(kind: &'static str, id: &str, stats: Option<&ContainerStats>) -> String {
    let e = Event {
        kind,
        id,
        data: stats.map(Stats::from),
    };
    serde_json::to_string(&e).unwrap_or_default()
}

/// Writes a line to stdout; `false` once stdout is gone (a closed pipe ends `events` quietly).
fn emit(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// `kata-snap events`.
pub fn events(g: &GlobalOpts, args: EventsArgs) -> Result<i32> {
    let id = args.id.as_str();
    // runc's order: the container, then the interval, then its status.
    Store::lookup(g.root()).load(id)?;
    if args.interval.is_zero() {
        bail!("duration interval must be greater than 0");
    }
    let dir = running(g, id, || format!("container with id {id} is not running"))?;
    let mut agent = super::exec::connect(&dir)?;
    let first = agent.stats().map_err(agent_error)?;
    if args.stats {
        emit(&event_line("stats", id, Some(&first)));
        return Ok(0);
    }
    let store = Store::lookup(g.root());
    let mut oom_kills = first.memory.events.oom_kill;
    let mut next_stats = Instant::now() + args.interval;
    loop {
        std::thread::sleep(OOM_POLL.min(next_stats.saturating_duration_since(Instant::now())));
        let stopped = store
            .load(id)
            .map(|r| r.current_status() == Status::Stopped)
            .unwrap_or(true);
        if stopped {
            return Ok(0);
        }
        let s = match agent.stats() {
            Ok(s) => s,
            // The VM went away with the container, or the container stopped in it.
            Err(ClientError::Agent { .. } | ClientError::Protocol(_)) => return Ok(0),
            Err(e) => return Err(agent_error(e)),
        };
        if s.memory.events.oom_kill > oom_kills && !emit(&event_line("oom", id, None)) {
            return Ok(0);
        }
        oom_kills = s.memory.events.oom_kill;
        if Instant::now() >= next_stats {
            next_stats += args.interval;
            if !emit(&event_line("stats", id, Some(&s))) {
                return Ok(0);
            }
        }
    }
}

/// `kata-snap checkpoint`: refused.
pub fn checkpoint() -> Result<i32> {
    bail!(CHECKPOINT_UNSUPPORTED)
}

#[cfg(test)]
#[path = "update_tests.rs"]
mod tests;

//! OCI `linux.seccomp` compiled into the BPF programs the guest agent
//! installs ([`agent_protocol::SeccompProgram`]), read from the JSON itself so
//! that an unknown syscall name is skipped alone, as runc (libseccomp) skips
//! it.
//!
//! The programs come from the rust-vmm `seccompiler` crate, whose filters have
//! one action on a match and one otherwise. A profile with several actions is
//! expressed as several filters, which the kernel runs one after the other,
//! taking the most severe answer:
//!
//! ```text
//!  default action D (when not SCMP_ACT_ALLOW): every syscall some rule names
//!    (with that rule's argument conditions) -> ALLOW, anything else -> D
//!  for each other action A of the rules:       the syscalls of A's rules
//!    (with their conditions) -> A, anything else -> ALLOW
//! ```
//!
//! The filters are installed one `seccomp(2)` call at a time, each call going
//! through the filters already in: the default's goes after the others,
//! except those acting on `seccomp` itself, which go last.
//!
//! A syscall that matches a rule gets that rule's action (ALLOW from the first
//! filter, A from its own); one that matches none gets D. Syscall names are
//! looked up with the `syscalls` crate for the guest's architecture (the
//! host's: KVM runs guests of its own architecture). What seccompiler's
//! programs do on another architecture (a 32-bit `int 0x80` call): kill the
//! process, where libseccomp applies the listed `architectures`' numbers.
//!
//! As runc: `defaultErrnoRet` and `errnoRet` default to `EPERM`; a rule whose
//! action is the default's is skipped; conditions on distinct arguments must
//! all hold (one rule), conditions repeating an argument index each make a
//! rule of their own (any may hold); `SCMP_CMP_MASKED_EQ` compares
//! `arg & value == valueTwo`; the flags `SECCOMP_FILTER_FLAG_LOG` and
//! `SECCOMP_FILTER_FLAG_SPEC_ALLOW` are passed to the kernel, `TSYNC` is
//! accepted (the agent's child has one thread); without a `flags` field,
//! `SPEC_ALLOW` is set. `SCMP_ACT_NOTIFY` and `listenerPath` are refused: the
//! notification descriptor lives in the guest kernel and cannot reach a
//! listener on the host.

use std::collections::BTreeMap;
use std::str::FromStr;

use agent_protocol::seccomp::{
    BPF_MAXINSNS, MAX_SECCOMP_FILTERS, MAX_SECCOMP_INSNS, SECCOMP_FLAG_LOG, SECCOMP_FLAG_SPEC_ALLOW,
};
use agent_protocol::{BpfInstruction, SeccompProgram};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde_json::Value;

use crate::error::ConfigError;

/// Most entries of `syscalls` (Docker's default profile has about 400 names in a few dozen).
const MAX_RULES: usize = 4096;

fn bad(what: impl Into<String>) -> ConfigError {
    ConfigError::Seccomp(what.into())
}

/// An action as the kernel takes it (errno values resolved).
fn action(name: &str, errno: u32) -> Result<SeccompAction, ConfigError> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno),
        // libseccomp's SCMP_ACT_KILL is SECCOMP_RET_KILL_THREAD.
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno),
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_NOTIFY" => {
            return Err(bad(
                "SCMP_ACT_NOTIFY is not supported: seccomp notifications stay in the guest kernel and cannot reach a listener on the host",
            ));
        }
        other => return Err(bad(format!("unknown action {:?}", cut(other)))),
    })
}

fn cut(s: &str) -> String {
    s.chars().take(64).collect()
}

fn errno_of(v: Option<&Value>, field: &str) -> Result<u32, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(libc::EPERM as u32),
        Some(v) => v
            .as_u64()
            .filter(|e| *e <= 4095)
            .map(|e| e as u32)
            .ok_or_else(|| bad(format!("{field} must be an errno number (0..=4095)"))),
    }
}

fn str_list<'a>(v: Option<&'a Value>, field: &str) -> Result<Vec<&'a str>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| bad(format!("{field} must be a list of strings")))
            })
            .collect(),
        Some(_) => Err(bad(format!("{field} must be a list of strings"))),
    }
}

/// The conditions of one `syscalls[]` entry, as the rules seccompiler takes.
fn rules_of(args: Option<&Value>) -> Result<Vec<SeccompRule>, ConfigError> {
    let list = match args {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("syscalls[].args must be a list")),
    };
    let mut conds = Vec::new();
    let mut seen = [0usize; 6];
    for a in list {
        let num = |k: &str| a.get(k).and_then(Value::as_u64);
        let index = num("index").ok_or_else(|| bad("syscalls[].args[].index is missing"))?;
        if index > 5 {
            return Err(bad(format!("syscalls[].args[].index {index} is above 5")));
        }
        let value = num("value").unwrap_or(0);
        let value_two = num("valueTwo").unwrap_or(0);
        let op = a.get("op").and_then(Value::as_str).unwrap_or("");
        let (op, operand) = match op {
            "SCMP_CMP_NE" => (SeccompCmpOp::Ne, value),
            "SCMP_CMP_LT" => (SeccompCmpOp::Lt, value),
            "SCMP_CMP_LE" => (SeccompCmpOp::Le, value),
            "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, value),
            "SCMP_CMP_GE" => (SeccompCmpOp::Ge, value),
            "SCMP_CMP_GT" => (SeccompCmpOp::Gt, value),
            // libseccomp: (arg & value) == valueTwo.
            "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(value), value_two),
            other => {
                return Err(bad(format!("unknown argument operator {:?}", cut(other))));
            }
        };
        seen[index as usize] += 1;
        conds.push(
            SeccompCondition::new(index as u8, SeccompCmpArgLen::Qword, op, operand)
                .map_err(|e| bad(e.to_string()))?,
        );
    }
    if conds.is_empty() {
        return Ok(Vec::new());
    }
    // runc: one rule with every condition, unless an argument is named twice (libseccomp
    // cannot AND two conditions on one argument): then a rule per condition.
    let groups: Vec<Vec<SeccompCondition>> = if seen.iter().any(|n| *n > 1) {
        conds.into_iter().map(|c| vec![c]).collect()
    } else {
        vec![conds]
    };
    groups
        .into_iter()
        .map(|g| SeccompRule::new(g).map_err(|e| bad(e.to_string())))
        .collect()
}

/// Rules of one action: syscall number to its rules, an empty list matching
/// every call.
type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

fn merge(map: &mut RuleMap, nr: i64, rules: &[SeccompRule]) {
    match map.get_mut(&nr) {
        // Unconditional already: stays so.
        Some(existing) if existing.is_empty() => {}
        Some(existing) if rules.is_empty() => existing.clear(),
        Some(existing) => existing.extend(rules.iter().cloned()),
        None => {
            map.insert(nr, rules.to_vec());
        }
    }
}

fn to_wire(p: BpfProgram) -> Vec<BpfInstruction> {
    p.into_iter()
        .map(|i| BpfInstruction {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// The flags runc passes for `flags` (absent: `SPEC_ALLOW`).
fn flags_of(v: Option<&Value>) -> Result<u32, ConfigError> {
    if matches!(v, None | Some(Value::Null)) {
        return Ok(SECCOMP_FLAG_SPEC_ALLOW);
    }
    let mut flags = 0;
    for f in str_list(v, "linux.seccomp.flags")? {
        flags |= match f {
            "SECCOMP_FILTER_FLAG_TSYNC" => 0,
            "SECCOMP_FILTER_FLAG_LOG" => SECCOMP_FLAG_LOG,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => SECCOMP_FLAG_SPEC_ALLOW,
            other => {
                return Err(bad(format!("flag {:?} is not supported", cut(other))));
            }
        };
    }
    Ok(flags)
}

/// The OCI name of the architecture the filters are for (the guest's, which is the host's).
pub fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "SCMP_ARCH_X86_64",
        "aarch64" => "SCMP_ARCH_AARCH64",
        "riscv64" => "SCMP_ARCH_RISCV64",
        other => other,
    }
}

/// Compiles `linux.seccomp` (the JSON as written). `None`: nothing to install
/// (an allow-everything profile). Unknown syscall names are skipped, each
/// with a note in `notes`.
pub fn compile(
    raw: &Value,
    notes: &mut Vec<String>,
) -> Result<Option<SeccompProgram>, ConfigError> {
    let obj = raw
        .as_object()
        .ok_or_else(|| bad("linux.seccomp must be an object"))?;
    if obj.get("listenerPath").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "listenerPath is not supported: seccomp notifications stay in the guest kernel and cannot reach a listener on the host",
        ));
    }
    let default_name = obj
        .get("defaultAction")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("defaultAction is missing"))?;
    let default = action(
        default_name,
        errno_of(obj.get("defaultErrnoRet"), "defaultErrnoRet")?,
    )?;
    let flags = flags_of(obj.get("flags"))?;
    let calls = match obj.get("syscalls") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => return Err(bad("syscalls must be a list")),
    };
    if calls.len() > MAX_RULES {
        return Err(bad(format!(
            "syscalls has {} entries, more than {MAX_RULES}",
            calls.len()
        )));
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| bad(e.to_string()))?;
    // Every named syscall for the ALLOW filter; per other action, its own.
    let mut named = RuleMap::new();
    let mut by_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    let mut unknown = Vec::new();
    for c in calls {
        let act_name = c
            .get("action")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("syscalls[].action is missing"))?;
        let act = action(
            act_name,
            errno_of(c.get("errnoRet"), "syscalls[].errnoRet")?,
        )?;
        let rules = rules_of(c.get("args"))?;
        if act == default {
            continue;
        }
        for name in str_list(c.get("names"), "syscalls[].names")? {
            let Ok(nr) = syscalls::Sysno::from_str(name) else {
                unknown.push(cut(name));
                continue;
            };
            let nr = nr.id() as i64;
            merge(&mut named, nr, &rules);
            if act == SeccompAction::Allow {
                continue;
            }
            match by_action.iter_mut().find(|(a, _)| *a == act) {
                Some((_, map)) => merge(map, nr, &rules),
                None => {
                    let mut map = RuleMap::new();
                    merge(&mut map, nr, &rules);
                    by_action.push((act.clone(), map));
                }
            }
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        unknown.dedup();
        notes.push(format!(
            "linux.seccomp: unknown syscalls skipped (as runc does): {}",
            unknown.join(", ")
        ));
    }
    // Install order: each `seccomp(2)` call that installs one goes through the filters already
    // in. The default's filter lets through what the profile names (seccomp itself when named)
    // and stops the rest, so it goes after the other actions' filters, except those that act
    // on seccomp itself, which go last.
    let seccomp_nr = syscalls::Sysno::seccomp.id() as i64;
    let (last, first): (Vec<_>, Vec<_>) = by_action
        .into_iter()
        .partition(|(_, map)| map.contains_key(&seccomp_nr));
    let mut filters = Vec::new();
    for (act, map) in first {
        filters.push(SeccompFilter::new(map, SeccompAction::Allow, act, arch));
    }
    if default != SeccompAction::Allow {
        filters.push(SeccompFilter::new(
            named,
            default.clone(),
            SeccompAction::Allow,
            arch,
        ));
    }
    for (act, map) in last {
        filters.push(SeccompFilter::new(map, SeccompAction::Allow, act, arch));
    }
    if filters.is_empty() {
        return Ok(None);
    }
    if filters.len() > MAX_SECCOMP_FILTERS {
        return Err(bad(format!(
            "{} distinct actions, more than {}",
            filters.len() - 1,
            MAX_SECCOMP_FILTERS - 1
        )));
    }
    let mut programs = Vec::new();
    for f in filters {
        let f = f.map_err(|e| bad(e.to_string()))?;
        let prog: BpfProgram = f.try_into().map_err(|e: seccompiler::BackendError| {
            bad(format!("cannot compile the filter: {e}"))
        })?;
        if prog.len() > BPF_MAXINSNS {
            return Err(bad(format!(
                "a filter of {} instructions is above the kernel's {BPF_MAXINSNS}",
                prog.len()
            )));
        }
        programs.push(to_wire(prog));
    }
    let total: usize = programs.iter().map(Vec::len).sum();
    if total > MAX_SECCOMP_INSNS {
        return Err(bad(format!(
            "the filters have {total} instructions, more than {MAX_SECCOMP_INSNS}"
        )));
    }
    Ok(Some(SeccompProgram {
        filters: programs,
        flags,
    }))
}

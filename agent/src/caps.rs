//! The capability sets of a container process (OCI `process.capabilities`),
//! applied in the child in runc's order: bounding set while still root,
//! `PR_SET_KEEPCAPS` across the uid change, then `capset(2)` and the ambient
//! set.

use std::io::Read;

use agent_protocol::Capabilities;

/// Highest capability number assumed when the kernel does not say.
const FALLBACK_LAST_CAP: u32 = 63;

/// The kernel's highest capability number (`/proc/sys/kernel/cap_last_cap`),
/// read in the agent before the fork (the child's root may have no /proc);
/// [`FALLBACK_LAST_CAP`] when unreadable (numbers the kernel lacks then fail
/// with `EINVAL`, which is ignored).
pub fn last_cap() -> u32 {
    let mut buf = [0u8; 16];
    let n = std::fs::File::open("/proc/sys/kernel/cap_last_cap")
        .and_then(|mut f| f.read(&mut buf))
        .unwrap_or(0);
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|n| *n <= FALLBACK_LAST_CAP)
        .unwrap_or(FALLBACK_LAST_CAP)
}

fn prctl(op: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: the prctl operations used here take integer arguments only.
    if unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops from the bounding set every capability up to `last` that `keep`
/// lacks. Needs CAP_SETPCAP (the agent's root has it).
pub fn drop_bounding(keep: u64, last: u32) -> std::io::Result<()> {
    for cap in 0..=last {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        match prctl(libc::PR_CAPBSET_DROP, cap.into(), 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `PR_SET_KEEPCAPS`: keep the permitted set across the change from root to
/// another uid.
pub fn set_keep_caps(on: bool) -> std::io::Result<()> {
    prctl(libc::PR_SET_KEEPCAPS, on.into(), 0)
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets the effective, permitted and inheritable sets of this process
/// (bits above `last` are left out), then clears the ambient set and raises
/// in it each capability that is both permitted and inheritable (the
/// kernel's rule; runc since 1.2 only warns about the others).
pub fn apply(c: &Capabilities, last: u32) -> std::io::Result<()> {
    let valid = if last >= 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    let (eff, perm, inh) = (
        c.effective & valid,
        c.permitted & valid,
        c.inheritable & valid,
    );
    let word = |v: u64, hi: bool| if hi { (v >> 32) as u32 } else { v as u32 };
    let data: [CapData; 2] = [false, true].map(|hi| CapData {
        effective: word(eff, hi),
        permitted: word(perm, hi),
        inheritable: word(inh, hi),
    });
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads a v3 header and two data structs, both laid out as
    // the kernel's (repr(C)) and alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    match prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
    ) {
        Ok(()) => {}
        // A kernel before 4.3 has no ambient set.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(()),
        Err(e) => return Err(e),
    }
    let raisable = c.ambient & perm & inh;
    for cap in 0..=last {
        if raisable & (1u64 << cap) == 0 {
            continue;
        }
        match prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            cap.into(),
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_last_cap_is_the_kernels() {
        let want = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(FALLBACK_LAST_CAP);
        assert_eq!(last_cap(), want);
        // CAP_AUDIT_READ (37) exists since Linux 3.16.
        assert!(last_cap() >= 37);
    }
}

//! After a restore from a template snapshot every clone has the same clock and
//! the same entropy pool as the template: the host sends the real time and
//! fresh random bytes, and the agent applies them through [`RestoreOps`].
//!
//! The VM implementation ([`KernelRestoreOps`]) calls `clock_settime` and the
//! `RNDADDENTROPY` ioctl; the harness one ([`DryRunRestoreOps`]) only records
//! and logs what it would do, so tests never touch the host's clock.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use thiserror::Error;

/// Errors of applying restore values.
#[derive(Debug, Error)]
pub enum RestoreError {
    /// `clock_settime` failed.
    #[error("cannot step the clock: {0}")]
    Clock(nix::Error),
    /// Opening `/dev/urandom` failed.
    #[error("cannot open /dev/urandom: {0}")]
    OpenRandom(std::io::Error),
    /// `RNDADDENTROPY` failed.
    #[error("RNDADDENTROPY failed: {0}")]
    AddEntropy(std::io::Error),
    /// `RNDRESEEDCRNG` failed.
    #[error("RNDRESEEDCRNG failed: {0}")]
    ReseedCrng(std::io::Error),
}

/// Applies the values the host sends after a restore. Inputs are already
/// validated by the protocol layer.
pub trait RestoreOps {
    /// Steps `CLOCK_REALTIME` to `realtime_ns` nanoseconds since the epoch.
    fn step_clock(&mut self, realtime_ns: u64) -> Result<(), RestoreError>;
    /// Mixes `bytes` into the entropy pool, crediting 8 bits per byte.
    fn reseed(&mut self, bytes: &[u8]) -> Result<(), RestoreError>;
}

/// The real thing, for the VM.
#[derive(Debug, Default)]
pub struct KernelRestoreOps;

/// `struct rand_pool_info` with an inline buffer (linux/random.h).
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; 512],
}

// RNDADDENTROPY is _IOW('R', 0x03, int[2]); RNDRESEEDCRNG is _IO('R', 0x07).
mod ioctl {
    nix::ioctl_write_ptr!(rnd_add_entropy, b'R', 0x03, [libc::c_int; 2]);
    nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);
}
use ioctl::{rnd_add_entropy, rnd_reseed_crng};

impl RestoreOps for KernelRestoreOps {
    fn step_clock(&mut self, realtime_ns: u64) -> Result<(), RestoreError> {
        let ts = libc::timespec {
            tv_sec: (realtime_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (realtime_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec that outlives the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(RestoreError::Clock(nix::Error::last()));
        }
        tracing::info!(realtime_ns, "clock stepped");
        Ok(())
    }

    fn reseed(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        let mut info = RandPoolInfo {
            entropy_count: 0,
            buf_size: 0,
            buf: [0; 512],
        };
        let n = bytes.len().min(info.buf.len());
        info.buf[..n].copy_from_slice(&bytes[..n]);
        info.buf_size = n as libc::c_int;
        info.entropy_count = (n * 8) as libc::c_int;
        let f = OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(RestoreError::OpenRandom)?;
        // SAFETY: `info` is a valid rand_pool_info whose buf_size does not
        // exceed its inline buffer; the kernel reads it and keeps no pointer.
        unsafe { rnd_add_entropy(f.as_raw_fd(), (&raw const info).cast()) }
            .map_err(|e| RestoreError::AddEntropy(e.into()))?;
        // Crediting entropy does not change the keys a ready CRNG generates from (they are
        // renewed on a timer, up to a minute later): every clone of a template would go on
        // reading the template's random stream. Reseed the CRNG from the pool now.
        // SAFETY: RNDRESEEDCRNG takes no argument.
        match unsafe { rnd_reseed_crng(f.as_raw_fd()) } {
            Ok(_) => {}
            // Not ready yet: the credited bytes make it ready, seeded with them.
            Err(nix::Error::ENODATA) => tracing::warn!("CRNG not ready; not reseeded"),
            Err(e) => return Err(RestoreError::ReseedCrng(e.into())),
        }
        tracing::info!(bytes = n, "entropy pool and CRNG reseeded");
        Ok(())
    }
}

/// Records what would be applied; used in harness mode and in tests.
#[derive(Debug, Default)]
pub struct DryRunRestoreOps {
    /// Every clock value received.
    pub clock_steps: Vec<u64>,
    /// Every reseed received.
    pub reseeds: Vec<Vec<u8>>,
}

impl RestoreOps for DryRunRestoreOps {
    fn step_clock(&mut self, realtime_ns: u64) -> Result<(), RestoreError> {
        tracing::info!(realtime_ns, "harness mode: would step CLOCK_REALTIME");
        self.clock_steps.push(realtime_ns);
        Ok(())
    }

    fn reseed(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        tracing::info!(
            bytes = bytes.len(),
            "harness mode: would add entropy (RNDADDENTROPY)"
        );
        self.reseeds.push(bytes.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rndaddentropy_request_code_matches_kernel() {
        // RNDADDENTROPY from linux/random.h on x86-64.
        let code = nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>());
        assert_eq!(code as u64, 0x4008_5203);
    }

    #[test]
    fn test_rndreseedcrng_request_code_matches_kernel() {
        // RNDRESEEDCRNG from linux/random.h.
        let code: u64 = nix::request_code_none!(b'R', 0x07);
        assert_eq!(code, 0x5207);
    }

    #[test]
    fn test_rand_pool_info_layout_matches_kernel() {
        assert_eq!(std::mem::offset_of!(RandPoolInfo, entropy_count), 0);
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf_size), 4);
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
    }

    #[test]
    fn test_dry_run_records_values() {
        let mut ops = DryRunRestoreOps::default();
        ops.step_clock(1_700_000_000_000_000_000).unwrap();
        ops.reseed(&[1, 2, 3]).unwrap();
        assert_eq!(ops.clock_steps, vec![1_700_000_000_000_000_000]);
        assert_eq!(ops.reseeds, vec![vec![1, 2, 3]]);
    }
}

//! The READY signal: one byte written to I/O port 0xf4 once the agent listens.
//! The VMM pauses and snapshots the template VM when it sees it.

use agent_protocol::{READY_IO_PORT, READY_VALUE};
use thiserror::Error;

use crate::config::Mode;

/// Errors of signalling READY.
#[derive(Debug, Error)]
pub enum ReadyError {
    /// `ioperm` was refused.
    #[error("ioperm(0x{port:x}) failed: {source}")]
    Ioperm {
        /// Port.
        port: u16,
        /// Cause.
        source: std::io::Error,
    },
}

/// Tells the VMM the agent is listening. In harness mode only logs.
pub fn signal_ready(mode: Mode) -> Result<(), ReadyError> {
    match mode {
        Mode::Harness => {
            tracing::info!(
                port = READY_IO_PORT,
                "harness mode: skipping READY write to the I/O port"
            );
            Ok(())
        }
        Mode::Vm => write_port(READY_IO_PORT, READY_VALUE),
    }
}

#[cfg(target_arch = "x86_64")]
fn write_port(port: u16, value: u8) -> Result<(), ReadyError> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    let rc = unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) };
    if rc != 0 {
        return Err(ReadyError::Ioperm {
            port,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: ioperm above granted access to exactly this port; the VMM traps
    // the write, and `out` touches no memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
    tracing::info!(port, value, "READY written");
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn write_port(port: u16, value: u8) -> Result<(), ReadyError> {
    tracing::warn!(
        port,
        value,
        "no port I/O on this architecture; READY not written"
    );
    Ok(())
}

//! A seccomp filter as the host compiled it (from the bundle's OCI
//! `linux.seccomp`) for the agent to install in the container's processes.
//!
//! The host does all the work (names to numbers, actions, argument
//! conditions); the agent only checks the bounds below and hands the
//! programs to `seccomp(2)`, which checks each instruction again.

use serde::{Deserialize, Serialize};

/// Most instructions in one classic BPF program (the kernel's `BPF_MAXINSNS`).
pub const BPF_MAXINSNS: usize = 4096;
/// Most programs in one [`SeccompProgram`]: one per distinct action of the
/// profile, plus one for its default action.
pub const MAX_SECCOMP_FILTERS: usize = 16;
/// Most instructions of all the programs together. The kernel refuses a
/// process whose filters pass 32768 instructions, each filter counting 4
/// more; this leaves room for filters the process installs itself.
pub const MAX_SECCOMP_INSNS: usize = 16 * 1024;
/// `SECCOMP_FILTER_FLAG_LOG`.
pub const SECCOMP_FLAG_LOG: u32 = 1 << 1;
/// `SECCOMP_FILTER_FLAG_SPEC_ALLOW`.
pub const SECCOMP_FLAG_SPEC_ALLOW: u32 = 1 << 2;
/// The flags a [`SeccompProgram`] may carry.
pub const SECCOMP_FLAGS_KNOWN: u32 = SECCOMP_FLAG_LOG | SECCOMP_FLAG_SPEC_ALLOW;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpfInstruction {
    /// Opcode.
    pub code: u16,
    /// Jump offset when true.
    pub jt: u8,
    /// Jump offset when false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// The container's seccomp filter: programs installed in order, each with
/// `seccomp(SECCOMP_SET_MODE_FILTER, flags)`. The kernel runs every one on
/// each system call and takes the most severe answer, which is how a profile
/// with several actions is expressed (see `oci_bundle::seccomp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompProgram {
    /// 1..=[`MAX_SECCOMP_FILTERS`] programs of 1..=[`BPF_MAXINSNS`]
    /// instructions, [`MAX_SECCOMP_INSNS`] in all.
    pub filters: Vec<Vec<BpfInstruction>>,
    /// `SECCOMP_FILTER_FLAG_*`, within [`SECCOMP_FLAGS_KNOWN`].
    pub flags: u32,
}

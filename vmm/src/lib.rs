//! kata-snap's VMM core: a KVM VM with its vCPUs, guest memory, the Linux x86-64 boot protocol,
//! legacy devices on PIO/MMIO buses, an io_uring event loop and a control socket.
//!
//! Entry point: [`vm::run`] with a [`vm::VmConfig`]. The memory map is in [`layout`], the boot
//! steps in [`boot`], the vCPU lifecycle in [`vcpu`], the loop in [`event_loop`], the control
//! protocol in [`control`].

#![deny(missing_docs)]

pub mod arch;
pub mod boot;
pub mod control;
pub mod host;
pub mod layout;
pub mod persist;
pub mod seccomp;
pub mod stop;
pub mod vcpu;
pub mod vm;

pub use event_loop;

pub use devices::legacy::SerialOutput;
pub use stop::StopReason;
pub use vm::{KernelImage, VmConfig, VmReport};

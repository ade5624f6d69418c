//! Device models of kata-snap: legacy PIO devices and virtio-mmio devices (block, vsock, rng;
//! see `docs/devices.md` for how they are wired into the VMM and snapshotted).
//!
//! Devices see guest accesses as *offsets* into their own range: the [`bus::Bus`] resolves an
//! absolute port or MMIO address to the device and range-checks the access once, so no device ever
//! handles an address outside what it registered. Devices know nothing of KVM beyond the event fds
//! (irqfd triggers) handed to them.

#![deny(missing_docs)]

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod persist;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

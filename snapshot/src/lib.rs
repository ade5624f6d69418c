//! kata-snap snapshots.
//!
//! A snapshot is a directory, written under a temporary name and renamed into place when complete
//! ([`dir`]):
//! - `state`: a header (magic, format version, body length, CRC-64) and the serialized VM
//!   ([`format`]); the checksum is verified before the body is parsed;
//! - `memory`: guest RAM as a sparse file, zero pages left as holes ([`memory`]);
//! - `workingset` (optional): the pages a restored guest touched, in first-touch order
//!   ([`workingset`]).
//!
//! The three files carry one snapshot identity ([`id`]), checked on restore.
//!
//! Guest memory comes back through one interface ([`memory_source`]): eager, mmap and uffd
//! sources each map the layout, say how the mapping is registered with userfaultfd and supply a
//! page source ([`source`]) where faults need answering. The [`page_server`] answers userfaultfd
//! faults through that source; [`prefetch`] installs a recorded working set in large batches
//! through the same path. Snapshot files are opened as hostile input ([`file`]).
//!
//! This crate stores what the VMM hands it; it knows nothing of vCPUs or devices.

#![deny(missing_docs)]

pub mod dir;
pub mod file;
pub mod format;
pub mod id;
pub mod memory;
pub mod memory_source;
pub mod page_server;
pub mod prefetch;
pub mod source;
pub mod workingset;

pub use id::SnapshotId;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;

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
//! Restoring memory lazily is the [`page_server`]'s job: it answers userfaultfd faults from the
//! memory file (UFFDIO_COPY) or with zero pages for holes (UFFDIO_ZEROPAGE); [`prefetch`] installs a
//! recorded working set in large batched io_uring reads.
//!
//! This crate stores what the VMM hands it; it knows nothing of vCPUs or devices.

#![deny(missing_docs)]

pub mod dir;
pub mod format;
pub mod memory;
pub mod page_server;
pub mod prefetch;
pub mod workingset;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;

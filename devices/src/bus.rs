//! Port-I/O and MMIO buses.
//!
//! A bus maps non-overlapping address ranges to devices. An access is dispatched only when it lies
//! entirely inside one device's range; the device receives the offset from the start of its range.
//! Devices reached from vCPU threads live behind a `Mutex`: several vCPUs may exit on the same device
//! at once, and the event loop may feed the same device (serial input).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A device that can sit on a [`Bus`].
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus (vCPU threads) and whoever else needs it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors registering a device on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Start of the range it overlaps.
        other: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space (port I/O or MMIO) with devices on it.
#[derive(Default)]
pub struct Bus {
    entries: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

/// Locks a device, recovering from a poisoned lock: a device's state stays usable even if a thread
/// panicked while holding it (the VMM reports that panic separately).
pub fn lock_device<T: ?Sized>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The closest range starting at or below `base`, and the first one starting after it.
        if let Some((&other, e)) = self.entries.range(..=base).next_back()
            && other + e.len > base
        {
            return Err(BusError::Overlap { base, len, other });
        }
        if let Some((&other, _)) = self.entries.range(base..).next()
            && other < end
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device and offset for an access of `size` bytes at `addr`, if one device covers all of it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then_some((offset, &entry.device))
    }

    /// Dispatches a read. Returns `false` when no device covers the access (data is left as is).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock_device(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns `false` when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock_device(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        accesses: Vec<(char, u64, usize)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.accesses.push(('r', offset, data.len()));
            data.fill(0xab);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.accesses.push(('w', offset, data.len()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn test_bus_dispatch_inside_range_gives_offset() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut byte = [0u8; 1];
        assert!(bus.read(0x3fd, &mut byte));
        assert_eq!(byte, [0xab]);
        assert!(bus.write(0x3f8, &[1]));
        assert_eq!(dev.lock().unwrap().accesses, vec![('r', 5, 1), ('w', 0, 1)]);
    }

    #[test]
    fn test_bus_access_straddling_end_is_unhandled() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0x100e, &mut buf));
        assert!(!bus.write(0x1010, &[0]));
        assert!(!bus.read(0xfff, &mut buf[..1]));
        assert!(bus.read(0x100c, &mut buf));
        assert_eq!(dev.lock().unwrap().accesses, vec![('r', 0xc, 4)]);
    }

    #[test]
    fn test_bus_access_near_u64_max_does_not_overflow() {
        let mut bus = Bus::new();
        bus.insert(recorder(), u64::MAX - 3, 3).unwrap();
        let mut buf = [0u8; 8];
        assert!(!bus.read(u64::MAX - 1, &mut buf));
    }

    #[test]
    fn test_bus_insert_overlapping_range_is_refused() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x60, 1).unwrap();
        bus.insert(recorder(), 0x64, 1).unwrap();
        assert_eq!(
            bus.insert(recorder(), 0x5f, 2),
            Err(BusError::Overlap {
                base: 0x5f,
                len: 2,
                other: 0x60
            })
        );
        assert_eq!(
            bus.insert(recorder(), 0x64, 1),
            Err(BusError::Overlap {
                base: 0x64,
                len: 1,
                other: 0x64
            })
        );
        assert_eq!(
            bus.insert(recorder(), 0x0, 0),
            Err(BusError::InvalidRange { base: 0, len: 0 })
        );
        assert_eq!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(recorder(), 0x61, 3).unwrap();
    }
}

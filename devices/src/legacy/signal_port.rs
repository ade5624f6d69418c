//! The guest signal port (I/O port `0xf4`, design section 3).
//!
//! The guest writes one byte. `1` means READY: the guest reached the point a template is taken at.
//! Other values are reserved and ignored (but counted, so a misbehaving guest shows up in status).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::legacy::VmNotifier;

/// The I/O port of the signal device.
pub const SIGNAL_PORT: u16 = 0xf4;

/// What the guest said on the signal port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestSignal {
    /// `1`: the guest is ready (agent up, or a test guest's marker).
    Ready,
    /// Any other value: reserved, ignored by the VMM.
    Reserved(u8),
}

impl From<u8> for GuestSignal {
    fn from(value: u8) -> Self {
        match value {
            1 => GuestSignal::Ready,
            other => GuestSignal::Reserved(other),
        }
    }
}

/// The signal port device.
pub struct SignalPort {
    notifier: Arc<dyn VmNotifier>,
}

impl std::fmt::Debug for SignalPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalPort").finish_non_exhaustive()
    }
}

impl SignalPort {
    /// A port that forwards what the guest writes to `notifier`.
    pub fn new(notifier: Arc<dyn VmNotifier>) -> Self {
        Self { notifier }
    }
}

impl BusDevice for SignalPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a byte write to the port itself counts; wider writes are a guest bug and ignored.
        if offset == 0 && data.len() == 1 {
            self.notifier.guest_signal(GuestSignal::from(data[0]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<GuestSignal>>);
    impl VmNotifier for Log {
        fn reset_requested(&self) {}
        fn guest_signal(&self, s: GuestSignal) {
            self.0.lock().unwrap().push(s);
        }
    }

    #[test]
    fn test_signal_port_byte_writes_decode_ready_and_reserved() {
        let log = Arc::new(Log::default());
        let mut port = SignalPort::new(log.clone());
        port.write(0, &[1]);
        port.write(0, &[7]);
        port.write(0, &[1, 0]); // word write: ignored
        assert_eq!(
            *log.0.lock().unwrap(),
            vec![GuestSignal::Ready, GuestSignal::Reserved(7)]
        );
    }
}

//! Legacy PC devices: the 8250 serial port, the i8042 reset line and the guest signal port.

pub mod i8042;
pub mod serial;
pub mod signal_port;

pub use i8042::I8042;
pub use serial::{EventFdTrigger, Serial, SerialOutput};
pub use signal_port::{GuestSignal, SignalPort};

/// Where a device reports that the guest asked for something the VMM must act on.
///
/// Implemented by the VMM; devices call it from the vCPU thread that made the access.
pub trait VmNotifier: Send + Sync {
    /// The guest asked for a reset (i8042 `0xfe`).
    fn reset_requested(&self);
    /// The guest wrote a value to the signal port.
    fn guest_signal(&self, signal: GuestSignal);
}

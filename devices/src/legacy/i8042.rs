//! A minimal i8042 keyboard controller: enough for a guest to find it idle and to reset the machine.
//!
//! Port `0x60` (data) and `0x64` (status/command) are registered as one range `0x60..=0x64`; offset
//! 4 is the command port. Writing command `0xfe` pulses the CPU reset line, which ends the VM.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::legacy::VmNotifier;

/// Offset of the command/status register inside the `0x60..=0x64` range.
pub const COMMAND_OFFSET: u64 = 4;
/// The command that pulses the reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller.
pub struct I8042 {
    notifier: Arc<dyn VmNotifier>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller that reports reset requests to `notifier`.
    pub fn new(notifier: Arc<dyn VmNotifier>) -> Self {
        Self { notifier }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty, no data: the guest sees an idle controller.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.notifier.reset_requested();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::GuestSignal;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);
    impl VmNotifier for Log {
        fn reset_requested(&self) {
            self.0.lock().unwrap().push("reset".into());
        }
        fn guest_signal(&self, s: GuestSignal) {
            self.0.lock().unwrap().push(format!("{s:?}"));
        }
    }

    #[test]
    fn test_i8042_reset_command_notifies_once() {
        let log = Arc::new(Log::default());
        let mut dev = I8042::new(log.clone());
        dev.write(0, &[CMD_RESET_CPU]); // data port: not a command
        dev.write(COMMAND_OFFSET, &[0xaa]); // self-test: ignored
        assert!(log.0.lock().unwrap().is_empty());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(*log.0.lock().unwrap(), vec!["reset".to_string()]);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}

//! Exit statuses as runc reports them.

use nix::sys::wait::WaitStatus;

/// Exit status of a process that could not be found.
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status of a process that could not be invoked.
pub const EXIT_CANNOT_INVOKE: i32 = 126;

/// Maps a wait status to the status runc reports: the exit code, or
/// 128 + signal number for a signalled process. `None` for stops/continues.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code & 0xff),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn test_exit_code_exited_passes_code() {
        assert_eq!(
            exit_code(WaitStatus::Exited(Pid::from_raw(5), 42)),
            Some(42)
        );
    }

    #[test]
    fn test_exit_code_signalled_is_128_plus_signal() {
        let s = WaitStatus::Signaled(Pid::from_raw(5), Signal::SIGKILL, false);
        assert_eq!(exit_code(s), Some(137));
        let s = WaitStatus::Signaled(Pid::from_raw(5), Signal::SIGTERM, true);
        assert_eq!(exit_code(s), Some(143));
    }

    #[test]
    fn test_exit_code_stopped_is_none() {
        let s = WaitStatus::Stopped(Pid::from_raw(5), Signal::SIGSTOP);
        assert_eq!(exit_code(s), None);
    }
}

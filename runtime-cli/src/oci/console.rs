//! The container's terminal on the host side.
//!
//! With `--console-socket`, as runc does: a new pseudo-terminal whose master is sent over the
//! socket (SCM_RIGHTS, the message being the pty's name); the supervisor keeps the other end,
//! in raw mode (the guest's pty does the line discipline), as its controlling terminal so that a
//! resize by the engine arrives as SIGWINCH. Without a socket (`run` or `exec` in the
//! foreground), as runc does: input from the caller's stdin (in raw mode until exit when it is a
//! terminal) and output to its stdout, so the output can be captured like any other.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::termios::{self, SetArg, Termios};

nix::ioctl_read_bad!(get_winsize, libc::TIOCGWINSZ, libc::winsize);
nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);
nix::ioctl_write_int_bad!(set_ctty, libc::TIOCSCTTY);

/// The terminal the supervisor bridges to the guest's.
#[derive(Debug)]
pub struct HostTerminal {
    /// Where the terminal's input is read.
    pub input: OwnedFd,
    /// Where the terminal's output is written.
    pub output: OwnedFd,
    /// The settings to put back on exit (the foreground case: the user's terminal).
    restore: Option<Termios>,
}

impl HostTerminal {
    /// A new pty whose master goes to the engine through `socket`; `size` (rows, cols) is set
    /// first when given.
    pub fn for_console_socket(socket: &Path, size: Option<(u16, u16)>) -> Result<Self> {
        let pty = nix::pty::openpty(None, None).context("cannot open a pseudo-terminal")?;
        if let Some((rows, cols)) = size {
            set_size(pty.master.as_fd(), rows, cols)?;
        }
        let name = nix::unistd::ttyname(pty.slave.as_fd()).unwrap_or_else(|_| "/dev/ptmx".into());
        raw(pty.slave.as_fd())?;
        // The supervisor is a session leader without a terminal: this one becomes its
        // controlling terminal, so the engine's resizes arrive as SIGWINCH.
        // SAFETY: TIOCSCTTY on a pty fd this process owns; 0 = do not steal from another session.
        if let Err(e) = unsafe { set_ctty(pty.slave.as_raw_fd(), 0) } {
            tracing::debug!("TIOCSCTTY: {e} (resizes will not be seen)");
        }
        let stream = UnixStream::connect(socket).with_context(|| {
            format!("cannot connect to the console socket {}", socket.display())
        })?;
        let fds = [pty.master.as_raw_fd()];
        let name = name.to_string_lossy().into_owned();
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(name.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .with_context(|| format!("cannot send the terminal over {}", socket.display()))?;
        // The engine has its copy; this process keeps the other end only.
        drop(pty.master);
        let output = pty
            .slave
            .try_clone()
            .context("cannot duplicate the terminal")?;
        Ok(Self {
            input: pty.slave,
            output,
            restore: None,
        })
    }

    /// The caller's stdin (in raw mode until dropped, when it is a terminal) and stdout.
    pub fn foreground() -> Result<Self> {
        let input = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate stdin")?;
        let output = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate stdout")?;
        let restore = termios::tcgetattr(input.as_fd()).ok();
        if restore.is_some() {
            raw(input.as_fd())?;
        }
        Ok(Self {
            input,
            output,
            restore,
        })
    }

    /// The terminal's size (rows, cols), if its input or output is a terminal.
    pub fn size(&self) -> Option<(u16, u16)> {
        [&self.input, &self.output].into_iter().find_map(|fd| {
            let mut ws = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the call.
            unsafe { get_winsize(fd.as_raw_fd(), &mut ws) }.ok()?;
            (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
        })
    }
}

impl Drop for HostTerminal {
    fn drop(&mut self) {
        if let Some(t) = &self.restore {
            let _ = termios::tcsetattr(self.input.as_fd(), SetArg::TCSANOW, t);
        }
    }
}

fn raw(fd: BorrowedFd<'_>) -> Result<()> {
    let mut t = termios::tcgetattr(fd).context("cannot read the terminal's settings")?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(fd, SetArg::TCSANOW, &t).context("cannot set the terminal to raw mode")
}

fn set_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from `ws`, which outlives the call.
    unsafe { set_winsize(fd.as_raw_fd(), &ws) }.context("cannot set the terminal size")?;
    Ok(())
}

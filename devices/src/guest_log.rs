//! A rate limit on log lines a guest can cause (a malformed chain, status bits out of order):
//! a hostile guest can do those things as fast as it likes, and one line each would grow the
//! VMM's log without bound. At most [`BURST`] such lines a second go out; the rest are counted
//! and reported in one line when the next second's first line goes out.
//!
//! One limiter for the process ([`guest_warn!`] uses it), like the log itself.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Lines let through per second.
pub const BURST: u64 = 20;

/// A per-second line budget.
#[derive(Debug)]
pub struct Limiter {
    start: OnceLock<Instant>,
    /// Second (since `start`) and lines in it, packed as `second << 32 | lines`.
    window: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    /// A full budget.
    pub const fn new() -> Self {
        Self {
            start: OnceLock::new(),
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may go out now: `Some(n)` with the lines suppressed since the last one
    /// that went out, or `None` (counted as suppressed).
    pub fn admit(&self) -> Option<u64> {
        let now = self.start.get_or_init(Instant::now).elapsed().as_secs();
        let mut cur = self.window.load(Ordering::Relaxed);
        loop {
            let (second, lines) = (cur >> 32, cur & 0xffff_ffff);
            let next = if second != now {
                (now << 32) | 1
            } else if lines < BURST {
                cur + 1
            } else {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            match self
                .window
                .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => cur = actual,
            }
        }
    }
}

/// The process's limiter for guest-caused lines.
pub fn limiter() -> &'static Limiter {
    static LIMITER: Limiter = Limiter::new();
    &LIMITER
}

/// `tracing::warn!` for a line a guest can cause, within the process's per-second budget.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if let Some(suppressed) = $crate::guest_log::limiter().admit() {
            if suppressed > 0 {
                tracing::warn!("{suppressed} guest-caused warnings suppressed (rate limit)");
            }
            tracing::warn!($($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_limiter_lets_burst_through_then_counts_the_rest() {
        let l = Limiter::new();
        let through = (0..100).filter(|_| l.admit().is_some()).count() as u64;
        // All within one second (or, rarely, across a boundary: then at most two bursts).
        assert!(through == BURST || through <= 2 * BURST, "{through}");
        assert!(through < 100);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let reported = l.admit().expect("a new second lets a line through");
        assert_eq!(reported, 100 - through, "the suppressed lines are reported");
        assert_eq!(l.admit(), Some(0));
    }
}

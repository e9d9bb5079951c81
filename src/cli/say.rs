//! Lines that commands running for minutes (`boot`, `verify-boot`,
//! `relocate --wait`, `files restore`, `agent-backup`, `agent-restore`,
//! `precopy`) print while they work, written so that a failed write
//! cannot break the work.
//!
//! `println!` and `eprintln!` panic when the write fails. A terminal that
//! was closed (SIGHUP, the tty hung up) fails every later write with EIO:
//! a progress line then panicked in the middle of the work (exit 101),
//! skipping the orderly end (QEMU stopped, scratch mounts removed, the
//! verdict as the exit status), and a panic in the signal thread left
//! the stop flag unset (fixmisc 1). Here a failed write marks its stream
//! gone: nothing more is written to it, and the command goes on, or ends
//! through its cleanup, with the exit status its work deserves.
//!
//! Tested end to end (`tests/closed_terminal.rs`): a unit test would have
//! to fork the multithreaded test harness, whose child can deadlock on a
//! stdout lock another thread held at the fork.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Standard output, then standard error: set after a failed write.
static GONE: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
/// The errno of that failed write (0: none, or not an OS error).
static ERRNO: [AtomicI32; 2] = [AtomicI32::new(0), AtomicI32::new(0)];

/// Which stream a line goes to.
#[derive(Clone, Copy)]
pub(crate) enum To {
    Out = 0,
    Err = 1,
}

/// Writes `args` to `to` (nothing once it has failed); false if it is gone.
pub(crate) fn write(to: To, args: std::fmt::Arguments) -> bool {
    let gone = &GONE[to as usize];
    if gone.load(Ordering::Relaxed) {
        return false;
    }
    let r = match to {
        To::Out => {
            let mut o = std::io::stdout().lock();
            o.write_fmt(args).and_then(|()| o.flush())
        }
        To::Err => std::io::stderr().lock().write_fmt(args),
    };
    match r {
        Ok(()) => true,
        Err(e) => {
            ERRNO[to as usize].store(e.raw_os_error().unwrap_or(0), Ordering::Relaxed);
            gone.store(true, Ordering::Relaxed);
            false
        }
    }
}

/// Whether a write to `to` has failed.
pub(crate) fn gone(to: To) -> bool {
    GONE[to as usize].load(Ordering::Relaxed)
}

/// The error of the write that marked `to` gone.
pub(crate) fn failure(to: To) -> Option<std::io::Error> {
    let errno = ERRNO[to as usize].load(Ordering::Relaxed);
    match gone(to) {
        false => None,
        true if errno == 0 => Some(std::io::Error::other("write failed")),
        true => Some(std::io::Error::from_raw_os_error(errno)),
    }
}

/// `println!` that a failed write cannot panic: false once stdout is gone.
macro_rules! say {
    () => { $crate::cli::say::write($crate::cli::say::To::Out, format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::cli::say::write($crate::cli::say::To::Out, format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that a failed write cannot panic: false once stderr is gone.
macro_rules! tell {
    () => { $crate::cli::say::write($crate::cli::say::To::Err, format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::cli::say::write($crate::cli::say::To::Err, format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprint!` that a failed write cannot panic.
macro_rules! tell_part {
    ($($arg:tt)*) => {
        $crate::cli::say::write($crate::cli::say::To::Err, format_args!($($arg)*))
    };
}

//! Errors as a kind plus context, with one mapping to errno shared by every
//! frontend (FUSE today, NFS later), so a corrupt chunk is EIO everywhere.

use std::fmt;
use std::io;
use std::sync::Arc;

/// What went wrong, independent of where. Frontends map this to errno;
/// the CLI maps it to a one-line message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A VM, backup, session, repository or path that does not exist.
    NotFound,
    /// Input the user can fix: bad name, bad size, wrong kind of file.
    InvalidInput,
    /// Stored data failed verification: digest mismatch, bad manifest, bad map.
    Corrupt,
    /// The resource is in use: locked staging, open disk file, busy mount.
    Busy,
    /// Something that must be new already exists.
    AlreadyExists,
    /// The operation is refused by design (truncating a disk, writing vm.json).
    NotPermitted,
    /// Out of space on the staging or repository filesystem.
    NoSpace,
    /// Any other I/O failure.
    Io,
    /// Stopped on request (SIGINT/SIGTERM) before it was done.
    Interrupted,
}

/// The library's error: a kind, a human context naming the object, and the
/// underlying OS error if there was one. Cheap to clone so that one failed
/// fetch can be handed to every reader waiting on it.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Arc<io::Error>>,
    /// The store did not answer the request in its deadline (see
    /// [`Error::unanswered`]).
    unanswered: bool,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
            unanswered: false,
        }
    }

    /// A request the store did not answer within its deadline (kind
    /// `Io`): unlike any other failure, it says nothing about the object
    /// and much about the store, so callers that decide whether a store
    /// stopped answering (`verify`) test for it, not for the text.
    pub fn unanswered(context: impl Into<String>) -> Self {
        Error {
            unanswered: true,
            ..Self::new(ErrorKind::Io, context)
        }
    }

    /// Whether this is [`Error::unanswered`]'s error.
    pub fn is_unanswered(&self) -> bool {
        self.unanswered
    }

    /// Wraps an OS error; ENOSPC/EDQUOT and ENOENT keep their meaning.
    pub fn io(context: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ => match err.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
                io::ErrorKind::PermissionDenied => ErrorKind::NotPermitted,
                _ => ErrorKind::Io,
            },
        };
        Error {
            kind,
            context: context.into(),
            source: Some(Arc::new(err)),
            unanswered: false,
        }
    }

    pub fn not_found(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, context)
    }
    pub fn invalid(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, context)
    }
    pub fn corrupt(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, context)
    }
    pub fn busy(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, context)
    }
    pub fn not_permitted(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotPermitted, context)
    }
    pub fn interrupted(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Interrupted, context)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The single errno mapping used by every frontend.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::Corrupt => libc::EIO,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::AlreadyExists => libc::EEXIST,
            ErrorKind::NotPermitted => libc::EPERM,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Interrupted => libc::EINTR,
            ErrorKind::Io => self
                .source
                .as_ref()
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::EIO),
        }
    }

    /// Prefixes more context, keeping kind and source.
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(src) => write!(f, "{}: {}", self.context, src),
            None => f.write_str(&self.context),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Adds context to `io::Result`s at the call site: `file.sync_data().ctx("sync x")?`.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_data_maps_to_eio_for_every_frontend() {
        assert_eq!(Error::corrupt("chunk abc").errno(), libc::EIO);
    }

    #[test]
    fn full_disk_keeps_its_meaning() {
        let e = Error::io("write", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), libc::ENOSPC);
    }

    #[test]
    fn context_is_prefixed_and_os_error_appended() {
        let e = Error::io("open x", io::Error::from_raw_os_error(libc::ENOENT)).context("repo");
        assert!(e.to_string().starts_with("repo: open x: "));
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}

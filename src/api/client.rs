//! A minimal blocking HTTP/1.1 client for the control socket. The CLI
//! sends one request per connection, so `Connection: close` plus reading
//! to EOF is all the protocol it needs (chunked bodies are decoded too).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// What an error says when the daemon closed the connection before any
/// answer (see [`Client::unanswered`]).
const NO_ANSWER: &str = "closed the connection without an answer";

pub struct Client {
    socket: PathBuf,
    /// The socket is the default link (no `--socket` given): with
    /// several daemons it names only one, so "unknown VM" says which.
    default_link: bool,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_path_buf(),
            default_link: false,
        }
    }

    /// A client of the daemon behind the default link `link`.
    pub fn via_default_link(link: &Path) -> Self {
        Client {
            socket: link.to_path_buf(),
            default_link: true,
        }
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.request("GET", path, None, DEFAULT_TIMEOUT)
    }
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.request("POST", path, Some(body), DEFAULT_TIMEOUT)
    }
    pub fn delete(&self, path: &str) -> Result<Value> {
        self.request("DELETE", path, None, DEFAULT_TIMEOUT)
    }

    /// Whether `e` is a request the daemon never answered (the connection
    /// closed, or failed while the answer was awaited), as opposed to an
    /// answer that is an error: only the first can be a cancel's doing.
    pub fn unanswered(e: &Error) -> bool {
        let text = e.to_string();
        e.kind() == ErrorKind::Io
            && (text.contains(NO_ANSWER) || text.starts_with("control socket"))
    }

    /// `POST /sessions/{vm}/backup`: answers when the backup is published,
    /// which may take as long as storing every changed block.
    pub fn backup_session(&self, vm: &str) -> Result<Value> {
        self.backup_session_with(vm, |_| {})
    }

    /// [`Self::backup_session`] that its caller can cancel: `connected`
    /// gets a handle of the connection once the request is sent. Shutting
    /// down its write side (or closing it) tells the daemon that the
    /// client went away: it cancels the backup and closes the connection.
    pub fn backup_session_with(
        &self,
        vm: &str,
        connected: impl FnOnce(UnixStream),
    ) -> Result<Value> {
        self.request_with(
            "POST",
            &format!("/sessions/{vm}/backup"),
            Some(&Value::Object(Default::default())),
            // No limit: it stores every block changed since its base, and
            // a client that gives up cancels it (Ctrl-C does, at will).
            None,
            connected,
        )
    }

    /// Why nobody answers: a link (the default one) names the socket of
    /// a daemon that is gone, while another daemon may well run.
    fn no_daemon(&self, e: &std::io::Error) -> String {
        let shown = self.socket.display();
        match std::fs::read_link(&self.socket) {
            Ok(to) => format!(
                "no recoverfs daemon on {shown} (a link to {}, {e}: the daemon that made it is \
                 gone); pass --socket with a running daemon's socket, or start one with \
                 `recoverfs serve`",
                to.display()
            ),
            Err(_) => {
                format!("no recoverfs daemon on {shown} ({e}); start one with `recoverfs serve`")
            }
        }
    }

    /// Why `--socket` names no socket at all: a directory (the one the
    /// socket is in, say: the sockets in it are named) or a plain file.
    fn not_a_socket(&self) -> Option<Error> {
        use std::os::unix::fs::FileTypeExt;
        let t = std::fs::metadata(&self.socket).ok()?.file_type();
        let what = if t.is_socket() {
            return None;
        } else if t.is_dir() {
            "a directory"
        } else if t.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        let mut msg = format!(
            "--socket {} is {what}, not a daemon's control socket: give the socket file (`serve --socket`)",
            self.socket.display()
        );
        if t.is_dir() {
            let mut inside: Vec<String> = std::fs::read_dir(&self.socket)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
                .map(|e| e.path().display().to_string())
                .collect();
            inside.sort();
            if !inside.is_empty() {
                msg += &format!(", such as {}", inside.join(" or "));
            }
        }
        Some(Error::invalid(msg))
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.request_with(method, path, body, Some(timeout), |_| {})
    }

    fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
        connected: impl FnOnce(UnixStream),
    ) -> Result<Value> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::new(
                ErrorKind::NotPermitted,
                format!(
                    "permission denied on the control socket {}: run as its owner, or ask for \
                     serve --socket-group",
                    self.socket.display()
                ),
            ),
            _ => self
                .not_a_socket()
                .unwrap_or_else(|| Error::new(ErrorKind::NotFound, self.no_daemon(&e))),
        })?;
        s.set_read_timeout(timeout).ok();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: recoverfs\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let io = |e| Error::io(format!("control socket {}", self.socket.display()), e);
        s.write_all(req.as_bytes()).map_err(io)?;
        if let Ok(c) = s.try_clone() {
            connected(c);
        }
        let mut raw = vec![];
        s.read_to_end(&mut raw).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::new(
                ErrorKind::Io,
                format!(
                    "the daemon on {} did not answer within {} s (it may still carry the \
                     request out: check `recoverfs status`)",
                    self.socket.display(),
                    timeout.unwrap_or_default().as_secs()
                ),
            ),
            _ => io(e),
        })?;
        if raw.is_empty() {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the daemon on {} {NO_ANSWER} (stopped or killed?): check `recoverfs status`",
                    self.socket.display()
                ),
            ));
        }
        let (status, json) = parse_response(&raw)?;
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let mut msg = json
            .get("error")
            .and_then(|m| m.as_str())
            .unwrap_or("request failed")
            .to_string();
        if status == 404 && self.default_link {
            msg.push_str(&self.which_daemon());
        }
        let kind = match status {
            404 => ErrorKind::NotFound,
            400 => ErrorKind::InvalidInput,
            409 => ErrorKind::Busy,
            403 => ErrorKind::NotPermitted,
            507 => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Err(Error::new(kind, msg))
    }
}

impl Client {
    /// " (asked the daemon on SOCKET, the default link's; ...)": what
    /// an administrator with several daemons needs to read a "not found".
    fn which_daemon(&self) -> String {
        let target = std::fs::read_link(&self.socket)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| self.socket.display().to_string());
        format!(
            " (asked the daemon on {target}, which the default link {} names; another \
             daemon? pass --socket)",
            self.socket.display()
        )
    }
}

fn parse_response(raw: &[u8]) -> Result<(u16, Value)> {
    let bad = || Error::new(ErrorKind::Io, "malformed response from the daemon");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad())?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[split + 4..].to_vec();
    if chunked {
        body = dechunk(&body).ok_or_else(bad)?;
    }
    if body.is_empty() {
        return Ok((status, Value::Null));
    }
    Ok((status, serde_json::from_slice(&body).map_err(|_| bad())?))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![];
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..eol])
                .ok()?
                .split(';')
                .next()?
                .trim(),
            16,
        )
        .ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_closes_without_an_answer_is_named_not_a_malformed_response() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("c.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = c.read(&mut buf); // the request, then nothing
        });
        let e = Client::new(&sock).get("/sessions").unwrap_err().to_string();
        assert!(e.contains("closed the connection without an answer"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    /// A daemon on a fresh socket answering every request with 404.
    fn daemon_answering_404(sock: &Path) {
        let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            while let Ok((mut c, _)) = l.accept() {
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf);
                let body = r#"{"error":"unknown VM web"}"#;
                let _ = write!(
                    c,
                    "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
    }

    #[test]
    fn a_directory_or_plain_file_given_as_the_socket_is_named_as_such_in_one_line() {
        let d = tempfile::tempdir().unwrap();
        // The daemon's socket inside: named as the one to give.
        let _l = std::os::unix::net::UnixListener::bind(d.path().join("control.sock")).unwrap();
        let e = Client::new(d.path()).get("/status").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = e.to_string();
        let want = format!(
            "--socket {} is a directory, not a daemon's control socket: give the socket file (`serve --socket`), such as {}",
            d.path().display(),
            d.path().join("control.sock").display()
        );
        assert_eq!(e, want);
        let f = d.path().join("notes");
        std::fs::write(&f, b"").unwrap();
        let e = Client::new(&f).get("/status").unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "--socket {} is a regular file, not a daemon's control socket: give the socket file (`serve --socket`)",
                f.display()
            )
        );
    }

    #[test]
    fn a_default_link_to_a_daemon_that_is_gone_says_so_and_names_its_socket() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("gone.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let link = d.path().join("default.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = Client::via_default_link(&link).get("/health").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = e.to_string();
        assert!(
            e.contains(&sock.display().to_string())
                && e.contains("is gone")
                && e.contains("pass --socket"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_not_found_through_the_default_link_names_the_daemon_it_asked() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("a.sock");
        daemon_answering_404(&sock);
        let link = d.path().join("default.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = Client::via_default_link(&link)
            .get("/sessions/web")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = e.to_string();
        assert!(e.contains("unknown VM web"), "{e}");
        assert!(e.contains(&sock.display().to_string()), "{e}");
        assert!(e.contains("pass --socket"), "{e}");
        // Named explicitly, the daemon's own words are enough.
        let e = Client::new(&sock)
            .get("/sessions/web")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("--socket"), "{e}");
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n{\"a\":1}\n";
        assert_eq!(
            parse_response(plain).unwrap(),
            (200, serde_json::json!({"a":1}))
        );
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:2}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (404, serde_json::json!({"a":2}))
        );
    }

    #[test]
    fn only_a_request_left_without_an_answer_counts_as_unanswered_not_a_daemon_error() {
        let closed = Error::new(
            ErrorKind::Io,
            format!("the daemon on /run/x.sock {NO_ANSWER} (stopped or killed?)"),
        );
        assert!(Client::unanswered(&closed));
        let reset = Error::io(
            "control socket /run/x.sock",
            std::io::Error::from_raw_os_error(libc::ECONNRESET),
        );
        assert!(Client::unanswered(&reset));
        // A 500 the daemon answered: its message must reach the user.
        let answered = Error::new(
            ErrorKind::Io,
            "live backup of VM vm: backup b was written, but since.json could not be",
        );
        assert!(!Client::unanswered(&answered));
    }
}

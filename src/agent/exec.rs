//! Running a program in the guest through its agent: `guest-exec` (with
//! captured output) and `guest-exec-status`. The output QEMU's agent
//! returns is base64 and bounded by it (about 16 MiB per stream).

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};
use crate::qemu::guest_agent::GuestAgent;

/// A finished guest process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    /// Exit code, or `None` if a signal ended it.
    pub code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

impl Exited {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// "exit code N" or "signal N".
    pub fn status(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (_, Some(s)) => format!("signal {s}"),
            _ => "unknown status".into(),
        }
    }
}

/// Starts `argv` in the guest; its pid there.
pub fn spawn(ga: &mut GuestAgent, argv: &[&str]) -> Result<i64> {
    let (path, args) = argv
        .split_first()
        .ok_or_else(|| Error::invalid("nothing to run in the guest"))?;
    let r = ga.execute(
        "guest-exec",
        Some(json!({"path": path, "arg": args, "capture-output": true})),
        Duration::from_secs(30),
    )?;
    r.get("pid")
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::corrupt(format!("guest-exec answered without a pid: {r}")))
}

/// The process's end, if it has ended.
pub fn status(ga: &mut GuestAgent, pid: i64) -> Result<Option<Exited>> {
    let r = ga.execute(
        "guest-exec-status",
        Some(json!({ "pid": pid })),
        Duration::from_secs(30),
    )?;
    if !r.get("exited").and_then(Value::as_bool).unwrap_or(false) {
        return Ok(None);
    }
    let text = |k: &str| {
        r.get(k)
            .and_then(Value::as_str)
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    Ok(Some(Exited {
        code: r.get("exitcode").and_then(Value::as_i64),
        signal: r.get("signal").and_then(Value::as_i64),
        stdout: text("out-data"),
        stderr: text("err-data"),
    }))
}

/// Waits for `pid` to end, polling every 200 ms.
pub fn wait(ga: &mut GuestAgent, pid: i64, timeout: Duration) -> Result<Exited> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = status(ga, pid)? {
            return Ok(e);
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Io,
                format!("the guest process {pid} did not end within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `argv` in the guest to its end.
pub fn run(ga: &mut GuestAgent, argv: &[&str], timeout: Duration) -> Result<Exited> {
    let pid = spawn(ga, argv)?;
    wait(ga, pid, timeout)
}

/// Runs a shell command in the guest; its stdout, or an error with its
/// stderr if it fails.
pub fn sh(ga: &mut GuestAgent, script: &str, timeout: Duration) -> Result<String> {
    let e = run(ga, &["/bin/sh", "-c", script], timeout)?;
    if !e.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "in the guest, `{script}` failed ({}): {}",
                e.status(),
                e.stderr.trim()
            ),
        ));
    }
    Ok(e.stdout)
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

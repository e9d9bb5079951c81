//! `relocate`: a relocation's one-line status, a cancel's answer, and
//! `--wait`, which follows a relocation until it ends and says how.

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};
use crate::util::human_bytes;

pub(crate) fn relocation_line(r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    if let Some(finish) = r["cancel_unfinished"].as_str() {
        // Its own state, whatever `state` says for older readers (`failed`
        // in the daemon that tried, `not-resumed` after a restart).
        if r["cancel_unmarked"] == true {
            return format!(
                "CANCEL NOT RECORDED: the copy is stopped in this daemon, but nothing durable \
                 says cancel and a restarted daemon resumes it; {}/{} copied: {}; cancel again \
                 with `{finish}`",
                human_bytes(n("bytes_done")),
                human_bytes(n("bytes_total")),
                r["error"].as_str().unwrap_or("?"),
            );
        }
        return format!(
            "CANCEL UNFINISHED: the copy is stopped for good and never resumed, the VM is \
             served from staging; {}/{} copied: {}; finish the cancel with `{finish}`",
            human_bytes(n("bytes_done")),
            human_bytes(n("bytes_total")),
            r["error"].as_str().unwrap_or("?"),
        );
    }
    if r["state"] == "not-resumed" {
        // Not copying: what was done, why it stopped, what to do.
        return format!(
            "NOT RESUMED after a daemon restart, served from staging; {}/{} ({:.1}%) copied, \
             pass {}: {}; {}",
            human_bytes(n("bytes_done")),
            human_bytes(n("bytes_total")),
            n("bytes_done") as f64 * 100.0 / n("bytes_total").max(1) as f64,
            n("pass"),
            r["error"].as_str().unwrap_or("?"),
            r["note"].as_str().unwrap_or("?"),
        );
    }
    let mut line = format!(
        "{} pass {}  {}/{} ({:.1}%)  {}  dirty blocks {}",
        r["state"].as_str().unwrap_or("?"),
        n("pass"),
        human_bytes(n("bytes_done")),
        human_bytes(n("bytes_total")),
        n("bytes_done") as f64 * 100.0 / n("bytes_total").max(1) as f64,
        rate(r),
        n("dirty_blocks"),
    );
    if let Some(eta) = r["eta_s"].as_f64() {
        line += &format!("  ETA {eta:.0} s");
    }
    if let Some(p) = r["cutover_pause_ms"].as_f64() {
        line += &format!("  cutover pause {p:.1} ms");
    }
    if let Some(t) = r["note"].as_str() {
        line += &format!("  ({t})");
    }
    // Also on a `done` relocation whose commit was not made durable.
    if let Some(t) = r["error"].as_str() {
        line += &format!("  ERROR: {t}");
    }
    line
}

/// The copy's rate, or "stalled" while it waits for the repository (the
/// average would only decay: explore8 LOW).
fn rate(r: &Value) -> String {
    let waiting = (r["note"].as_str()).is_some_and(|n| n.starts_with("waiting for the repository"));
    match waiting {
        true => "stalled".into(),
        false => format!("{:.1} MB/s", r["rate_mbps"].as_f64().unwrap_or(0.0)),
    }
}

/// One line for a cancelled relocation (`POST .../relocate/cancel`).
pub(crate) fn cancelled_line(vm: &str, r: &Value, keep_target: bool) -> String {
    let paths = |k: &str| -> Vec<String> {
        (r[k].as_array().into_iter().flatten())
            .filter_map(|p| p.as_str().map(String::from))
            .collect()
    };
    let mut line = format!(
        "cancelled the relocation of VM {vm} to {}",
        r["target"].as_str().unwrap_or("?")
    );
    let (removed, kept) = (paths("removed"), paths("kept"));
    if !removed.is_empty() {
        line += &format!("; removed {}", removed.join(", "));
    }
    if !kept.is_empty() {
        let why = match keep_target {
            true => "as asked",
            false => "they were there before it",
        };
        line += &format!("; kept {} ({why})", kept.join(", "));
    }
    line
}

/// Follows a relocation until `wait_verdict` ends the wait: Ok only at a
/// clean cutover; a failure, a failed disk or a pause is an Err.
pub(crate) fn wait_relocation(
    c: &crate::api::client::Client,
    vm: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    wait_relocation_with(|| c.get(&format!("/sessions/{vm}")), vm, stop)
}

/// `wait_relocation` over `get` (the session's status). `stop` (a signal)
/// ends only the waiting: the relocation goes on in the daemon, and the
/// error says so and how to follow, pause or cancel it.
fn wait_relocation_with(
    mut get: impl FnMut() -> Result<Value>,
    vm: &str,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg}")
                .expect("template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(60);
    let mut warned = false;
    loop {
        let s = get()?;
        let r = &s["relocation"];
        let state = r["state"].as_str().unwrap_or("");
        bar.set_length(r["bytes_total"].as_u64().unwrap_or(0));
        bar.set_position(r["bytes_done"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{} pass {} ETA {}",
            rate(r),
            r["pass"],
            r["eta_s"]
                .as_f64()
                .map(|e| format!("{e:.0}s"))
                .unwrap_or_else(|| "-".into())
        ));
        if !tty && last.elapsed() >= std::time::Duration::from_secs(5) {
            tell!("{}", relocation_line(r));
            last = std::time::Instant::now();
        }
        if let Some(verdict) = wait_verdict(vm, &s) {
            bar.finish_and_clear();
            say!("{}", verdict?);
            return Ok(());
        }
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            bar.finish_and_clear();
            return Err(Error::interrupted(format!(
                "{}: stopped waiting; the relocation of VM {vm} to {} goes on in the daemon \
                 ({}): follow it again with `recoverfs relocate {vm} --resume --wait` (or \
                 `recoverfs status`), pause it with `recoverfs relocate {vm} --pause`, or \
                 cancel it with `recoverfs relocate {vm} --cancel`",
                crate::cli::stopped_by(),
                r["target"].as_str().unwrap_or("?"),
                relocation_line(r)
            )));
        }
        if state == "not-converging" && !warned {
            warned = true;
            bar.suspend(|| {
                tell!(
                    "warning: {}",
                    r["note"].as_str().unwrap_or("relocation is not converging")
                )
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// What `relocate --wait` makes of a session's status: `None` while the
/// relocation goes on, else the line to print on success or the one-line
/// error that ends the wait (a non-zero exit). Success is a cutover with no
/// error and no failed disk: a cutover whose commit could not be made
/// durable is `done` with an error, and its disks refuse writes. A paused
/// relocation ends the wait too, as an error: it is not relocated, and
/// nothing would resume it while the command polls.
pub(crate) fn wait_verdict(vm: &str, s: &Value) -> Option<Result<String>> {
    let r = &s["relocation"];
    if r.is_null() {
        // Gone (or never reopened by a restarted daemon): nothing to wait for.
        return Some(Err(Error::new(
            ErrorKind::NotFound,
            format!("VM {vm} has no relocation (none was started, or it was cancelled)"),
        )));
    }
    let state = r["state"].as_str().unwrap_or("");
    // Before `failed`: `--resume` refuses it, only a cancel ends it.
    if state == "not-resumed" || r["cancel_unfinished"].is_string() {
        return Some(Err(Error::busy(format!(
            "relocation of VM {vm} to {}: {}",
            r["target"].as_str().unwrap_or("?"),
            relocation_line(r)
        ))));
    }
    if let (Some(e), "done") = (r["error"].as_str(), state) {
        return Some(Err(Error::new(
            ErrorKind::Io,
            format!("relocation of VM {vm} cut over but failed: {e}"),
        )));
    }
    if state == "failed" {
        // A failed relocation keeps what it copied and `--resume` retries
        // it in the running daemon: say so, or the administrator is stuck.
        let e = r["error"].as_str().unwrap_or("no reason recorded");
        return Some(Err(Error::new(
            ErrorKind::Io,
            format!(
                "relocation of VM {vm} failed: {e}; fix the cause, then `recoverfs relocate {vm} \
                 --resume --wait` retries it from where it stopped (or `--cancel` drops it)"
            ),
        )));
    }
    let failed = s["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| Some((d["name"].as_str().unwrap_or("?"), d["failed"].as_str()?)));
    if let Some((disk, e)) = failed {
        return Some(Err(Error::new(
            ErrorKind::Io,
            format!(
                "relocation of VM {vm} ({state}): {disk} FAILED: {e}; flushes and writes get EIO until the session is released"
            ),
        )));
    }
    match state {
        "done" => Some(Ok(format!("relocated VM {vm}: {}", relocation_line(r)))),
        "paused" => Some(Err(Error::busy(format!(
            "relocation of VM {vm} is paused, not relocated ({}); `recoverfs relocate {vm} --resume --wait` continues it",
            relocation_line(r)
        )))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A session's status as `GET /sessions/{vm}` returns it, trimmed to
    /// what `--wait` reads.
    fn session(relocation: Value, disk_failed: Option<&str>) -> Value {
        json!({
            "relocation": relocation,
            "disks": [
                {"name": "disk0", "failed": null},
                {"name": "disk1", "failed": disk_failed},
            ],
        })
    }

    fn relocation(state: &str, error: Option<&str>) -> Value {
        json!({
            "state": state, "pass": 2, "bytes_done": 1 << 20, "bytes_total": 4 << 20,
            "rate_mbps": 50.0, "dirty_blocks": 3, "error": error, "note": null,
        })
    }

    #[test]
    fn a_relocation_line_shows_the_error_of_a_done_relocation() {
        let line = relocation_line(&relocation("done", Some("not durable")));
        assert!(
            line.starts_with("done") && line.ends_with("ERROR: not durable"),
            "{line}"
        );
    }

    #[test]
    fn a_signal_ends_the_wait_saying_the_relocation_goes_on_and_how_to_follow_pause_or_cancel_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = AtomicBool::new(false);
        let mut polls = 0;
        let e = wait_relocation_with(
            || {
                polls += 1;
                assert!(polls < 5, "the wait went on after the signal");
                // The signal comes while the relocation copies.
                stop.store(polls == 2, Ordering::SeqCst);
                Ok(session(relocation("copying", None), None))
            },
            "vm",
            &stop,
        )
        .expect_err("a wait cut short is not a relocation");
        assert_eq!((e.kind(), polls), (ErrorKind::Interrupted, 2));
        let e = e.to_string();
        for want in [
            "goes on in the daemon",
            "(copying",
            "recoverfs relocate vm --resume --wait",
            "recoverfs relocate vm --pause",
            "recoverfs relocate vm --cancel",
        ] {
            assert!(e.contains(want), "{want:?} not in: {e}");
        }
        // A relocation that has ended says how it ended, signal or not.
        stop.store(true, Ordering::SeqCst);
        let done =
            wait_relocation_with(|| Ok(session(relocation("done", None), None)), "vm", &stop);
        assert!(done.is_ok(), "{done:?}");
    }

    #[test]
    fn wait_goes_on_while_the_relocation_copies_or_switches() {
        for state in ["copying", "converging", "not-converging", "switching"] {
            assert!(
                wait_verdict("vm", &session(relocation(state, None), None)).is_none(),
                "{state}"
            );
        }
    }

    #[test]
    fn wait_succeeds_at_a_clean_cutover() {
        let line = wait_verdict("vm", &session(relocation("done", None), None))
            .unwrap()
            .unwrap();
        assert!(line.starts_with("relocated VM vm"), "{line}");
    }

    #[test]
    fn wait_fails_naming_the_error_of_a_relocation_that_failed_while_copying() {
        let e = wait_verdict(
            "vm",
            &session(
                relocation(
                    "failed",
                    Some("write relocation target disk1: Input/output error"),
                ),
                None,
            ),
        )
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("failed") && e.contains("disk1: Input/output error"),
            "{e}"
        );
        assert!(
            e.contains("`recoverfs relocate vm --resume --wait` retries it")
                && e.contains("--cancel"),
            "names the way on: {e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wait_fails_when_the_cutover_committed_but_was_not_made_durable() {
        let not_durable = "cutover: the cutover of VM vm committed but could not be made durable";
        let e = wait_verdict("vm", &session(relocation("done", Some(not_durable)), None))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("could not be made durable"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wait_fails_when_a_disk_of_the_session_has_failed() {
        let e = wait_verdict(
            "vm",
            &session(relocation("done", None), Some("staging sync failed: EIO")),
        )
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("disk1") && e.contains("staging sync failed"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wait_returns_non_zero_with_how_to_resume_when_the_relocation_is_paused() {
        let e = wait_verdict("vm", &session(relocation("paused", None), None))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("paused") && e.contains("--resume"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn a_relocation_not_resumed_is_shown_with_its_reason_and_ends_a_wait_non_zero() {
        let mut r = relocation(
            "not-resumed",
            Some("open relocation target /p/vm: No such file or directory"),
        );
        r["note"] = json!("run `recoverfs relocate vm --resume` once the target is reachable");
        let line = relocation_line(&r);
        assert!(
            line.starts_with("NOT RESUMED")
                && line.contains("1.0 MiB/4.0 MiB")
                && line.contains("No such file")
                && line.contains("--resume"),
            "{line}"
        );
        let e = wait_verdict("vm", &session(r, None))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("NOT RESUMED") && e.contains("--resume"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn an_unfinished_cancel_shows_as_such_with_the_command_that_finishes_it_and_ends_a_wait() {
        let error = "the relocation of VM vm to /p/vm was cancelled; its record could not be \
                     removed: remove relocation.json: Input/output error; run `recoverfs \
                     relocate vm --cancel` again";
        // `failed` in the daemon the cancel ran in, `not-resumed` after a
        // restart: older readers keep their state, the new field says more.
        for state in ["failed", "not-resumed"] {
            let mut r = relocation(state, Some(error));
            r["cancel_unfinished"] = json!("recoverfs relocate vm --cancel");
            let line = relocation_line(&r);
            assert!(
                line.starts_with("CANCEL UNFINISHED")
                    && line.contains("1.0 MiB/4.0 MiB")
                    && line.contains("Input/output error")
                    && line.ends_with("finish the cancel with `recoverfs relocate vm --cancel`")
                    && !line.contains("--resume"),
                "{line}"
            );
            let e = wait_verdict("vm", &session(r, None)).unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Busy);
            let e = e.to_string();
            assert!(
                e.contains("CANCEL UNFINISHED") && !e.contains("--resume"),
                "{e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // Not even its mark written: a restart resumes it, and the line
        // must not say "never resumed" (explore11 M2).
        let mut r = relocation(
            "failed",
            Some("write relocation.json: Operation not permitted"),
        );
        r["cancel_unfinished"] = json!("recoverfs relocate vm --cancel");
        r["cancel_unmarked"] = json!(true);
        let line = relocation_line(&r);
        assert!(
            line.starts_with("CANCEL NOT RECORDED")
                && line.contains("a restarted daemon resumes it")
                && !line.contains("never resumed")
                && line.ends_with("cancel again with `recoverfs relocate vm --cancel`"),
            "{line}"
        );
    }

    #[test]
    fn wait_fails_when_the_session_has_no_relocation() {
        let e = wait_verdict("vm", &session(Value::Null, None))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no relocation"), "{e}");
    }
}

//! `recoverfs recover VM...`: one daemon request per VM, in turn. A VM
//! that fails does not stop the others (they are independent), and the
//! command ends with one line naming the VMs that failed and those
//! recovered, so that a script sees which to retry.

use serde_json::{json, Value};

use super::{client, output, SocketArg};
use crate::error::{Error, Result};

pub struct RecoverArgs<'a> {
    pub vms: &'a [String],
    pub backup: Option<&'a str>,
    pub host: Option<&'a str>,
    pub export_point: &'a str,
    pub force: bool,
    pub second_copy: bool,
    pub explain: bool,
    pub json: bool,
}

pub fn run(socket: &SocketArg, a: RecoverArgs) -> Result<()> {
    for v in a.vms {
        crate::util::validate_name("VM name", v)?;
    }
    if a.backup.is_some() && a.vms.len() > 1 {
        return Err(Error::invalid(
            "--backup names one backup: recover one VM with it",
        ));
    }
    // Checked once, here: a name that does not resolve is one error, not
    // one per VM. The name itself is sent (the daemon resolves it too):
    // placement records and `--explain` show what the admin typed.
    if let Some(h) = &a.host {
        crate::session::resolve_host(h)?;
    }
    let host = a.host;
    let c = client(socket);
    // One after another: each placement sees the sessions before it.
    let tried = each(a.vms, |v| {
        let r = c.post(
            "/sessions",
            &json!({"vm": v, "backup": a.backup, "host": host,
                    "export_point": a.export_point, "force": a.force,
                    "second_copy": a.second_copy}),
        );
        match &r {
            Ok(r) if !a.json => {
                output::recovered(r, false);
                output::placement(r, a.explain);
            }
            // Shown as it comes, as a single VM's would be at the end.
            Err(e) if a.vms.len() > 1 => eprintln!("recoverfs: error: {e}"),
            _ => {}
        }
        r
    });
    if a.json {
        let mut out: Vec<Value> = tried
            .iter()
            .map(|(v, r)| match r {
                Ok(r) => r.clone(),
                Err(e) => json!({"vm": v, "error": e.to_string()}),
            })
            .collect();
        // One VM's failure is the command's error, with nothing on stdout.
        if out.len() == 1 && tried[0].1.is_ok() {
            println!(
                "{}",
                serde_json::to_string_pretty(&out.pop()).expect("json")
            );
        } else if out.len() > 1 {
            println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        }
    }
    outcome(tried)
}

/// Tries `recover` on every VM, in order, whatever the others gave.
fn each(
    vms: &[String],
    mut recover: impl FnMut(&str) -> Result<Value>,
) -> Vec<(String, Result<Value>)> {
    vms.iter().map(|v| (v.clone(), recover(v))).collect()
}

/// The command's result: a single VM's own error, or for several one
/// line naming the failed VMs and the recovered ones.
fn outcome(mut tried: Vec<(String, Result<Value>)>) -> Result<()> {
    if tried.len() == 1 {
        return tried.pop().expect("one").1.map(drop);
    }
    let failed: Vec<&str> = tried
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(v, _)| v.as_str())
        .collect();
    let Some(kind) = tried
        .iter()
        .find_map(|(_, r)| r.as_ref().err().map(|e| e.kind()))
    else {
        return Ok(());
    };
    let recovered: Vec<&str> = tried
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(v, _)| v.as_str())
        .collect();
    Err(Error::new(
        kind,
        format!(
            "{} of {} VMs not recovered: {} (errors above); recovered: {}",
            failed.len(),
            tried.len(),
            failed.join(", "),
            if recovered.is_empty() {
                "none".to_string()
            } else {
                recovered.join(", ")
            }
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_vm_that_fails_does_not_stop_the_next_and_the_error_names_failed_and_recovered() {
        let mut asked = vec![];
        let tried = each(&names(&["fs01", "fs0l", "db01"]), |v| {
            asked.push(v.to_string());
            match v {
                "fs0l" => Err(Error::not_found(format!("unknown VM {v:?}"))),
                _ => Ok(json!({"vm": v})),
            }
        });
        assert_eq!(asked, ["fs01", "fs0l", "db01"], "db01 was never tried");
        let e = outcome(tried).expect_err("a failed VM and exit 0");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "1 of 3 VMs not recovered: fs0l (errors above); recovered: fs01, db01"
        );
    }

    #[test]
    fn one_vm_fails_with_its_own_error_and_several_that_all_succeed_are_ok() {
        let e = outcome(each(&names(&["fs0l"]), |v| {
            Err(Error::not_found(format!("unknown VM {v:?}")))
        }))
        .unwrap_err();
        assert_eq!(e.to_string(), "unknown VM \"fs0l\"");
        let ok = each(&names(&["a", "b"]), |v| Ok(json!({"vm": v})));
        assert!(outcome(ok).is_ok());
        let none = outcome(each(&names(&["a", "b"]), |_| Err(Error::busy("busy"))));
        assert!(none.unwrap_err().to_string().ends_with("recovered: none"));
    }
}

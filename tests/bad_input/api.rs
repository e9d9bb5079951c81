//! Control API requests sent as a script's `curl` sends them: bad bodies
//! are refused in one line and change nothing.

use super::*;

/// A request on the daemon's socket with `curl`, as an administrator's
/// script sends it: `body` with `content_type` (none: what `curl
/// --data-binary` leaves it to choose, form-encoded). The HTTP status and
/// the reply's JSON.
fn api(
    env: &Env,
    method: &str,
    path: &str,
    body: &[u8],
    content_type: Option<&str>,
) -> (u16, serde_json::Value) {
    let sent = env.path("body.sent");
    std::fs::write(&sent, body).unwrap();
    let reply = env.path("body.reply");
    let mut args = vec![
        "-s".to_string(),
        "--unix-socket".into(),
        env.socket.to_str().unwrap().into(),
        "-X".into(),
        method.into(),
        "-o".into(),
        reply.to_str().unwrap().into(),
        "-w".into(),
        "%{http_code}".into(),
        "--data-binary".into(),
        format!("@{}", sent.display()),
    ];
    if let Some(ct) = content_type {
        args.extend(["-H".into(), format!("Content-Type: {ct}")]);
    }
    args.push(format!("http://x{path}"));
    let o = std::process::Command::new("curl")
        .args(&args)
        .output()
        .unwrap();
    let code: u16 = String::from_utf8_lossy(&o.stdout).parse().unwrap();
    let reply = std::fs::read(&reply).unwrap();
    let json = serde_json::from_slice(&reply).unwrap_or_else(|e| {
        panic!(
            "reply to {path} is not JSON ({e}): {}",
            String::from_utf8_lossy(&reply)
        )
    });
    (code, json)
}

/// A refusal: `code`, one line naming `needle`.
fn refused(reply: (u16, serde_json::Value), code: u16, needle: &str) {
    let (got, body) = reply;
    let e = body["error"].as_str().unwrap_or_default();
    assert_eq!(got, code, "{body}");
    assert!(e.contains(needle) && !e.contains('\n'), "{body}");
}

/// Over HTTP, as a script's `curl` sends them: a body with a misspelt field,
/// not JSON, missing or too large is refused in one line (400, 413) and
/// changes nothing; a misspelt field is never taken for one left out (the
/// newest backup for `bakup`, no rate limit for `rate`, removing the files
/// for `keep-target`).
#[test]
fn api_bodies_misspelt_malformed_or_too_large_are_refused_and_change_nothing() {
    let env = Env::new();
    let older = repo_with_vm(&env);
    random_image(&env.path("b.raw"), 4 * K64 + 10, 32, K64);
    env.backup("vm", "64K", &[&env.path("b.raw")]);
    let _d = env.serve();
    let no_sessions = |env: &Env| env.status()["sessions"].as_array().unwrap().is_empty();
    let misspelt = format!(r#"{{"vm":"vm","bakup":"{older}"}}"#);
    for ct in [None, Some("application/json")] {
        refused(
            api(&env, "POST", "/sessions", misspelt.as_bytes(), ct),
            400,
            "unknown field `bakup`",
        );
    }
    refused(
        api(&env, "POST", "/sessions", b"vm=vm", None),
        400,
        "not the JSON expected",
    );
    refused(
        api(&env, "POST", "/sessions", b"", None),
        400,
        "expected a JSON body",
    );
    assert!(no_sessions(&env), "a refused body recovered a VM");
    // The same request spelt right recovers the backup it names.
    let body = format!(r#"{{"vm":"vm","backup":"{older}"}}"#);
    let (code, r) = api(&env, "POST", "/sessions", body.as_bytes(), None);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["backup"], older.as_str(), "{r}");

    let primary = env.path("primary");
    std::fs::create_dir(&primary).unwrap();
    let to = primary.to_str().unwrap();
    let body = format!(r#"{{"to":"{to}","rate":1}}"#);
    refused(
        api(&env, "POST", "/sessions/vm/relocate", body.as_bytes(), None),
        400,
        "unknown field `rate`",
    );
    assert!(
        env.status()["sessions"][0]["relocation"].is_null(),
        "relocated without its rate limit"
    );
    let body = format!(r#"{{"to":"{to}","rate_mbps":0.001}}"#);
    let (code, r) = api(&env, "POST", "/sessions/vm/relocate", body.as_bytes(), None);
    assert_eq!(code, 200, "{r}");
    // A cancel that would keep the files, misspelt, or too large: the
    // relocation and its files stay.
    let cancel = "/sessions/vm/relocate/cancel";
    refused(
        api(&env, "POST", cancel, br#"{"keep-target":true}"#, None),
        400,
        "unknown field `keep-target`",
    );
    let huge = format!(r#"{{"keep_target":true,"pad":"{}"}}"#, "x".repeat(3 << 20));
    refused(
        api(
            &env,
            "POST",
            cancel,
            huge.as_bytes(),
            Some("application/json"),
        ),
        413,
        "too large",
    );
    let r = &env.status()["sessions"][0]["relocation"];
    assert_eq!(r["state"], "copying", "{r}");
    assert!(primary.join("vm/disk0.raw").exists());

    // A release query misspelt or of the wrong type: refused, still served.
    for q in ["dicsard=true", "discard=yes"] {
        refused(
            api(&env, "DELETE", &format!("/sessions/vm?{q}"), b"", None),
            400,
            "discard=true|false",
        );
    }
    assert_eq!(env.status()["sessions"].as_array().unwrap().len(), 1);

    let body = br#"{"vm":"vm","qmp":"/nonexistent/qmp.sock","max_rate_mbs":5}"#;
    refused(
        api(&env, "POST", "/precopy", body, None),
        400,
        "unknown field(s) max_rate_mbs",
    );
    let (_, jobs) = api(&env, "GET", "/precopy", b"", None);
    assert!(jobs["jobs"].as_array().unwrap().is_empty(), "{jobs}");
}

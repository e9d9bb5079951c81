//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, so both
//! the CLI and `curl --unix-socket` can drive a daemon. It runs on tokio at
//! the edge; every handler hops to a blocking thread for datastore work.
//!
//! | method | path | effect |
//! |---|---|---|
//! | GET | /health | daemon identity |
//! | GET | /sessions | status of every session, each staging directory, (`moved`) per export point the clients a restart left on addresses no longer served (until one attaches over NFS or NBD), and (`fuse_keeper`) the FUSE mount's keeper: state, since, restarts, pid, why |
//! | POST | /sessions `{"vm":..,"backup":..,"host":..,"export_point":..,"force":..}` | recover (start or resume), placed on an export point; the reply says where and why |
//! | GET | /export-points | every export point: sessions, hosts, queue, predicted latency |
//! | GET | /sessions/{vm} | status of one session, with (`moved`) its clients a restart left on addresses no longer served |
//! | DELETE | /sessions/{vm}?discard=true | release |
//! | GET | /sessions/{vm}/disks/{n}/changed | changed block ranges |
//! | POST | /sessions/{vm}/relocate `{"to":..,"rate_mbps":..,"force":..}` | start relocation; a caller that is not root names only a directory it may create in ([`pathauth`]) |
//! | POST | /sessions/{vm}/relocate/pause | pause the copy (durably; replies once the copier stopped, state `paused`) |
//! | POST | /sessions/{vm}/relocate/resume | resume a paused copy where it stopped, retry a failed one from its record (`relocate::retry`), or reopen one a restarted daemon could not (`relocate::not_resumed`) |
//! | POST | /sessions/{vm}/relocate/cancel `{"keep_target":..}` | cancel it for good (refused after cutover): copier stopped, record removed durably, target files it created removed; replies `{target, removed, kept}` |
//! | POST | /sessions/{vm}/backup | live backup from the changed-block map (replies when it is published; cancelled, nothing published, if the client goes away first) |
//! | POST | /sessions/{vm}/upload `{"load_limit":"latency=MS,queue=N"?}` | start the session uploader (pre-copy for a recovered VM; resumed after a restart) |
//! | GET | /sessions/{vm}/upload | its state (copying / throttled / halted / idle / paused), why, load, blocks uploaded, residue |
//! | DELETE | /sessions/{vm}/upload | stop it (what it uploaded stays usable) |
//! | GET, POST | /precopy | pre-copy jobs of running QEMU VMs ([`precopy`]) |
//! | DELETE | /precopy/{vm} | stop a pre-copy job |
//!
//! Bodies go through [`body`]: JSON whatever the Content-Type, unknown
//! fields refused, 400 or 413 as a JSON error like every other.

mod body;
pub mod client;
pub mod pathauth;
pub mod peer;
pub mod precopy;

use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, ErrorKind};
use crate::session::Datastore;
use body::{BodyShape, JsonBody, JsonOrEmpty};

type Ds = Arc<Datastore>;

struct ApiError(Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.0.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
            ErrorKind::Busy | ErrorKind::AlreadyExists => StatusCode::CONFLICT,
            ErrorKind::NotPermitted => StatusCode::FORBIDDEN,
            ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Corrupt | ErrorKind::Io => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Interrupted => StatusCode::SERVICE_UNAVAILABLE,
        };
        (
            code,
            Json(json!({"error": self.0.to_string(), "kind": format!("{:?}", self.0.kind())})),
        )
            .into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// Runs datastore work off the async threads.
async fn blocking<T: serde::Serialize + Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> ApiResult {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(Json(serde_json::to_value(v).expect("serializable"))),
        Ok(Err(e)) => Err(ApiError(e)),
        Err(e) => Err(ApiError(Error::new(
            ErrorKind::Io,
            format!("handler failed: {e}"),
        ))),
    }
}

pub fn router(ds: Ds) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/sessions", get(list_sessions).post(recover))
        .route("/export-points", get(export_points))
        .route("/sessions/{vm}", get(session_status).delete(release))
        .route("/sessions/{vm}/disks/{n}/changed", get(changed))
        .route("/sessions/{vm}/relocate", axum::routing::post(relocate))
        .route(
            "/sessions/{vm}/relocate/pause",
            axum::routing::post(pause_relocation),
        )
        .route(
            "/sessions/{vm}/relocate/resume",
            axum::routing::post(resume_relocation),
        )
        .route(
            "/sessions/{vm}/relocate/cancel",
            axum::routing::post(cancel_relocation),
        )
        .route("/sessions/{vm}/backup", axum::routing::post(backup_session))
        .route(
            "/sessions/{vm}/upload",
            get(upload_status).post(start_upload).delete(stop_upload),
        )
        .with_state(ds)
}

async fn health(State(ds): State<Ds>) -> ApiResult {
    Ok(Json(json!({
        "ok": true,
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "repo": ds.repo().location(),
        "mount": ds.mount(),
        "staging": ds.staging_root(),
    })))
}

async fn list_sessions(State(ds): State<Ds>) -> ApiResult {
    blocking(move || {
        let all: Vec<_> = ds.sessions().iter().map(|s| ds.status(s)).collect();
        let staging: Vec<_> = ds.stagings().iter().map(|d| d.budget().status()).collect();
        let moved = moved(&ds, |_| true);
        // Daemon-wide, also with no session (explore11 M3).
        let unconfirmed = ds.repo().backend().not_confirmed();
        // Daemon-wide too: whether the FUSE mount would outlive a crash.
        let keeper = ds.fuse_keeper();
        Ok(json!({ "sessions": all, "staging": staging, "moved": moved, "repository_unreachable": unconfirmed, "fuse_keeper": keeper }))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverBody {
    vm: String,
    backup: Option<String>,
    host: Option<String>,
    export_point: Option<String>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    second_copy: bool,
}

async fn export_points(State(ds): State<Ds>) -> ApiResult {
    blocking(move || Ok(json!({ "export_points": ds.point_status() }))).await
}

impl BodyShape for RecoverBody {
    const SHAPE: &'static str = r#"{"vm": NAME, "backup": ID?, "host": HOST?, "export_point": NAME?, "force": bool?, "second_copy": bool?}"#;
}

async fn recover(State(ds): State<Ds>, JsonBody(body): JsonBody<RecoverBody>) -> ApiResult {
    blocking(move || {
        let req = crate::session::PlaceRequest {
            host: body.host,
            export_point: body.export_point,
            force: body.force,
        };
        ds.recover_second_copy(&body.vm, body.backup.as_deref(), &req, body.second_copy)
    })
    .await
}

/// Clients a restart left on addresses no longer served, per export point,
/// of the VMs `of` takes while their sessions are served, over the
/// frontends that did not attach since (`daemon::exports_moved`).
fn moved(ds: &Ds, of: impl Fn(&str) -> bool) -> Vec<crate::staging::last_exports::Moved> {
    let vms_at = |p: &str| {
        (ds.sessions_at(p).iter())
            .filter(|s| of(&s.vm))
            .map(|s| (s.vm.clone(), s.network_reached()))
            .collect()
    };
    crate::staging::last_exports::moved(ds.staging_root(), vms_at)
}

async fn session_status(State(ds): State<Ds>, Path(vm): Path<String>) -> ApiResult {
    blocking(move || {
        let s = ds
            .session(&vm)
            .ok_or_else(|| Error::not_found(format!("no recovery session for VM {vm}")))?;
        let mut status = serde_json::to_value(ds.status(&s)).expect("serializable");
        // Its stranded clients, as `GET /sessions` names them (fixviews 2).
        status["moved"] = json!(moved(&ds, |v| v == vm));
        Ok(status)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseQuery {
    #[serde(default)]
    discard: bool,
    /// With `discard`: only the kept staging of this backup.
    backup: Option<String>,
}

async fn release(
    State(ds): State<Ds>,
    Path(vm): Path<String>,
    q: Result<Query<ReleaseQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    // `?dicsard=true` is not "keep staging", nor `?discard=yes` plain text.
    let Query(q) = q.map_err(|e| {
        ApiError(Error::invalid(format!(
            "{} (expected ?discard=true|false)",
            e.body_text()
        )))
    })?;
    blocking(move || {
        if let Some(b) = &q.backup {
            let (released, discarded, relocation) = ds.release_backup(&vm, b, q.discard)?;
            return Ok(json!({"vm": vm, "released": released, "backup": b, "discarded": discarded, "relocation": relocation}));
        }
        if ds.session(&vm).is_none() && q.discard {
            let kept = ds.discard_kept(&vm)?;
            if kept.is_empty() {
                return Err(Error::not_found(format!("no recovery session or kept staging for VM {vm}")));
            }
            return Ok(json!({"vm": vm, "released": false, "discarded": kept}));
        }
        let r = ds.release_report(&vm, q.discard)?;
        let backup = r.backup;
        // Kept, but its pin not written: the client says what that risks.
        let pin_owed = !q.discard && ds.kept_pin_owed(&vm, &backup);
        // `relocation`: what became of it (null without one).
        Ok(json!({"vm": vm, "released": true, "backup": backup, "discarded": if q.discard { vec![backup.clone()] } else { vec![] }, "pin_owed": pin_owed, "relocation": r.relocation}))
    })
    .await
}

async fn changed(State(ds): State<Ds>, Path((vm, n)): Path<(String, usize)>) -> ApiResult {
    blocking(move || {
        let s = ds.session(&vm).ok_or_else(|| Error::not_found(format!("no recovery session for VM {vm}")))?;
        let d = s.disks.get(n).ok_or_else(|| Error::not_found(format!("VM {vm} has no disk{n}")))?;
        let bs = d.block_size();
        let ranges: Vec<Value> = d
            .changed_ranges()
            .into_iter()
            .map(|(a, b)| {
                let end = (b * bs).min(d.size);
                json!({"start_block": a, "end_block": b, "offset": a * bs, "length": end - a * bs})
            })
            .collect();
        Ok(json!({"vm": vm, "disk": n, "block_size": bs, "size": d.size, "blocks_changed": d.status().blocks_changed, "ranges": ranges}))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelocateBody {
    to: std::path::PathBuf,
    rate_mbps: Option<f64>,
    #[serde(default)]
    force: bool,
}

impl BodyShape for RelocateBody {
    const SHAPE: &'static str = r#"{"to": DIR, "rate_mbps": N?, "force": bool?}"#;
}

async fn relocate(
    State(ds): State<Ds>,
    Path(vm): Path<String>,
    ConnectInfo(peer): ConnectInfo<peer::Peer>,
    JsonBody(b): JsonBody<RelocateBody>,
) -> ApiResult {
    blocking(move || {
        crate::util::validate_name("VM name", &vm)?;
        let to = pathauth::relocation_target(&peer.caller()?, &b.to, &vm)?;
        ds.relocate(&vm, &to, b.rate_mbps, b.force)
    })
    .await
}

async fn pause_relocation(State(ds): State<Ds>, Path(vm): Path<String>) -> ApiResult {
    blocking(move || ds.pause_relocation(&vm, true)).await
}

async fn resume_relocation(State(ds): State<Ds>, Path(vm): Path<String>) -> ApiResult {
    blocking(move || ds.pause_relocation(&vm, false)).await
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    keep_target: bool,
}

impl BodyShape for CancelBody {
    const SHAPE: &'static str = r#"{"keep_target": true|false}, or no body"#;
}

/// `UploadRequest` as the API takes it: it is also the stored
/// `upload.json`, which must stay readable with fields added later.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct UploadBody {
    load_limit: Option<String>,
}

impl BodyShape for UploadBody {
    const SHAPE: &'static str = r#"{"load_limit": "latency=MS,queue=N"}, or no body"#;
}

async fn cancel_relocation(
    State(ds): State<Ds>,
    Path(vm): Path<String>,
    JsonOrEmpty(b): JsonOrEmpty<CancelBody>,
) -> ApiResult {
    blocking(move || ds.cancel_relocation(&vm, b.keep_target)).await
}

/// Sets a live backup's cancel flag when dropped: hyper drops the handler
/// when the connection ends before the answer (it reads the EOF of a
/// client that went away: Ctrl-C, SIGTERM, a dropped ssh session).
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

async fn backup_session(State(ds): State<Ds>, Path(vm): Path<String>) -> ApiResult {
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Dropped after the answer too, when the flag no longer matters.
    let _on_drop = CancelOnDrop(cancel.clone());
    blocking(move || ds.backup_session_until(&vm, &cancel)).await
}

async fn start_upload(
    State(ds): State<Ds>,
    Path(vm): Path<String>,
    JsonOrEmpty(b): JsonOrEmpty<UploadBody>,
) -> ApiResult {
    let req = crate::session::UploadRequest {
        load_limit: b.load_limit,
    };
    blocking(move || ds.start_upload(&vm, req)).await
}

async fn upload_status(State(ds): State<Ds>, Path(vm): Path<String>) -> ApiResult {
    blocking(move || ds.upload_status(&vm)).await
}

async fn stop_upload(State(ds): State<Ds>, Path(vm): Path<String>) -> ApiResult {
    blocking(move || ds.stop_upload(&vm)).await
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    ds: Ds,
    jobs: Arc<crate::precopy::Jobs>,
    listener: peer::CheckedListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(ds).merge(precopy::router(jobs));
    // Handlers that act on a caller's paths read its credentials. A live
    // backup is cancelled when hyper drops its handler on the client's EOF
    // (`CancelOnDrop`): HTTP/1 half-close must stay off for that.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<peer::Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::FromRequest;

    /// What `JsonOrEmpty<T>` makes of `body` sent with `content_type`: the
    /// value, or the status the request is refused with.
    async fn read<T: serde::de::DeserializeOwned + Default + BodyShape>(
        body: &str,
        content_type: Option<&str>,
    ) -> Result<T, StatusCode> {
        let mut req = axum::http::Request::builder().method("POST");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req.body(axum::body::Body::from(body.to_owned())).unwrap();
        match JsonOrEmpty::<T>::from_request(req, &()).await {
            Ok(JsonOrEmpty(v)) => Ok(v),
            Err(e) => Err(e.into_response().status()),
        }
    }

    #[tokio::test]
    async fn a_cancel_body_without_content_type_is_read_and_only_an_empty_one_is_the_default() {
        let keep = r#"{"keep_target":true}"#;
        // None: what axum's Option<Json<_>> took for no body at all, so
        // the files were removed; the second is what `curl -d` sends.
        for ct in [
            None,
            Some("application/x-www-form-urlencoded"),
            Some("application/json"),
        ] {
            let b: CancelBody = read(keep, ct).await.unwrap();
            assert!(b.keep_target, "content-type {ct:?}");
        }
        for ct in [None, Some("application/json")] {
            for blank in ["", "\n"] {
                let b: CancelBody = read(blank, ct).await.unwrap();
                assert!(!b.keep_target, "{blank:?} {ct:?}");
            }
        }
        // Not the JSON expected: refused, never taken as "remove the files".
        for (body, ct) in [
            ("keep_target=true", None),
            (
                "keep_target=true",
                Some("application/x-www-form-urlencoded"),
            ),
            ("{\"keep_target\":", Some("application/json")),
            ("{\"keep_target\":1}", None),
            // A misspelt field is not "no field": refused, never "remove".
            ("{\"keep-target\":true}", Some("application/json")),
            ("{\"keepTarget\":true}", None),
        ] {
            let e = read::<CancelBody>(body, ct).await.unwrap_err();
            assert_eq!(e, StatusCode::BAD_REQUEST, "{body:?} {ct:?}");
        }
    }

    #[tokio::test]
    async fn an_upload_body_without_content_type_keeps_its_load_limit() {
        let r: UploadBody = read(r#"{"load_limit":"latency=50"}"#, None).await.unwrap();
        assert_eq!(r.load_limit.as_deref(), Some("latency=50"));
        let r: UploadBody = read("", None).await.unwrap();
        assert_eq!(r.load_limit, None);
        let e = read::<UploadBody>(r#"{"load-limit":"latency=50"}"#, None).await;
        assert_eq!(e.unwrap_err(), StatusCode::BAD_REQUEST);
    }
}

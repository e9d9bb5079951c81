//! `/precopy`: pre-copy jobs in the daemon ([`crate::precopy::Jobs`]).
//!
//! | method | path | effect |
//! |---|---|---|
//! | GET | /precopy | every job: state (copying / throttled / halted / waiting / ...), why, the guest's load, rounds, outcome |
//! | POST | /precopy `{"vm":..,"qmp":..,"agent":..,"every":..,"backup_at":..,"until":..,"load_limit":..}` | start (or resume) a VM's job, recorded durably first (a restarted daemon starts it again, checking the caller's recorded credentials once more: [`crate::precopy::Jobs::restore`]); a caller that is not root names only sockets it may connect to ([`super::pathauth`]) |
//! | DELETE | /precopy/{vm} | stop it at its next checkpoint (state kept), remove its record, and forget it |

use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::routing::{delete, get};
use axum::Router;
use serde_json::{json, Value};

use super::body::{refuse_unknown_fields, BodyShape, JsonBody};
use super::peer::Peer;
use super::{blocking, ApiError, ApiResult};
use crate::error::Error;
use crate::precopy::{Jobs, StartRequest};

type J = Arc<Jobs>;

pub fn router(jobs: J) -> Router {
    Router::new()
        .route("/precopy", get(list).post(start))
        .route("/precopy/{vm}", delete(stop))
        .with_state(jobs)
}

async fn list(State(j): State<J>) -> ApiResult {
    blocking(move || Ok(json!({ "jobs": j.list() }))).await
}

/// `POST /precopy`'s body: a `StartRequest`, which is also the job's
/// record (`job.json`, read by later versions with fields added), so its
/// unknown fields are refused here (`refuse_unknown_fields`), not by serde.
#[derive(serde::Deserialize)]
#[serde(transparent)]
struct StartBody(Value);

impl BodyShape for StartBody {
    const SHAPE: &'static str = r#"{"vm": NAME, "qmp": SOCKET, "agent": SOCKET?, "every": S?, "backup_at": T?, "until": T?, "chunk_size": BYTES?, "max_rate_mbps": N?, "load_limit": SPEC?}"#;
}

async fn start(
    State(j): State<J>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    JsonBody(StartBody(v)): JsonBody<StartBody>,
) -> ApiResult {
    let req = serde_json::from_value::<StartRequest>(v.clone())
        .map_err(|e| ApiError(Error::invalid(format!("bad pre-copy request: {e}"))))?;
    refuse_unknown_fields(&v, &req, StartBody::SHAPE)?;
    blocking(move || j.start(req, &peer.caller()?)).await
}

async fn stop(State(j): State<J>, Path(vm): Path<String>) -> ApiResult {
    blocking(move || j.stop(&vm)).await
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(body: &str) -> Result<StartRequest, String> {
        let v: Value = serde_json::from_str(body).unwrap();
        let req: StartRequest = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        refuse_unknown_fields(&v, &req, StartBody::SHAPE).map_err(|e| e.0.to_string())?;
        Ok(req)
    }

    #[test]
    fn the_readme_example_body_with_its_nulls_is_accepted_and_a_misspelt_field_refused() {
        // As README.md's control API table gives it (null fields included):
        // a field that stopped serialising would refuse it.
        let readme = r#"{"vm": "db01", "qmp": "/run/db01.qmp", "agent": null, "every": 60,
            "backup_at": 1700000000, "until": null, "chunk_size": 1048576,
            "max_rate_mbps": null, "load_limit": "latency=5"}"#;
        let req = checked(readme).unwrap();
        assert_eq!(req.load_limit.as_deref(), Some("latency=5"));
        assert!(checked(r#"{"vm": "db01", "qmp": "/run/db01.qmp"}"#).is_ok());
        let e = checked(r#"{"vm": "db01", "qmp": "/q", "max_rate_mbs": 5}"#).unwrap_err();
        assert!(e.contains("unknown field(s) max_rate_mbs"), "{e}");
    }
}

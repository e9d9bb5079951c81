//! Request bodies: read as JSON whatever the Content-Type says, refused in
//! one line (400) when they are not the JSON expected, 413 past axum's
//! body limit.
//!
//! axum's `Json<T>` and `Option<Json<T>>` do not do for requests that act
//! on a VM: `Option<Json<T>>` is `None` for a body sent without a JSON
//! Content-Type (what `curl -d` sends), which took `{"keep_target":true}`
//! for "no body" (and removed the files); their refusals are plain text
//! (415, 422) where every other error of this API is a JSON object. And
//! every body type here says `deny_unknown_fields`: a misspelt field is
//! not a field left out, `{"vm":"db","bakup":"ID"}` must not recover the
//! newest backup, nor `{"rate":10}` relocate without a rate limit.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::ApiError;
use crate::error::Error;

/// A request body's shape, for the one-line refusal.
pub(super) trait BodyShape {
    const SHAPE: &'static str;
}

/// A JSON body that must be there.
pub(super) struct JsonBody<T>(pub T);

/// A JSON body that may be left out: only an empty (or blank) body is
/// `T::default()`.
pub(super) struct JsonOrEmpty<T>(pub T);

/// Why a body was refused.
pub(super) enum BodyRejection {
    Refused(ApiError),
    /// Past axum's body limit (2 MB): no body of this API comes near it.
    TooLarge(String),
}

impl IntoResponse for BodyRejection {
    fn into_response(self) -> Response {
        match self {
            BodyRejection::Refused(e) => e.into_response(),
            BodyRejection::TooLarge(m) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(json!({"error": m, "kind": "InvalidInput"})),
            )
                .into_response(),
        }
    }
}

impl<T: DeserializeOwned + BodyShape, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = BodyRejection;

    async fn from_request(req: Request, state: &S) -> Result<Self, BodyRejection> {
        match parse::<T, S>(req, state).await? {
            Some(v) => Ok(JsonBody(v)),
            None => Err(BodyRejection::Refused(ApiError(Error::invalid(format!(
                "expected a JSON body {}",
                T::SHAPE
            ))))),
        }
    }
}

impl<T: DeserializeOwned + Default + BodyShape, S: Send + Sync> FromRequest<S> for JsonOrEmpty<T> {
    type Rejection = BodyRejection;

    async fn from_request(req: Request, state: &S) -> Result<Self, BodyRejection> {
        Ok(JsonOrEmpty(
            parse::<T, S>(req, state).await?.unwrap_or_default(),
        ))
    }
}

/// The body as a `T`, or `None` if it is blank (a client's stray newline
/// says nothing).
async fn parse<T: DeserializeOwned + BodyShape, S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<Option<T>, BodyRejection> {
    let body = axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => BodyRejection::TooLarge(format!(
                "the request body is too large ({}); expected {}",
                e.body_text(),
                T::SHAPE
            )),
            _ => BodyRejection::Refused(ApiError(Error::invalid(e.body_text()))),
        })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body).map(Some).map_err(|e| {
        BodyRejection::Refused(ApiError(Error::invalid(format!(
            "the request body is not the JSON expected ({}): {e}",
            T::SHAPE
        ))))
    })
}

/// Refuses the fields of `body` that `parsed` (a `T` read from it) does
/// not have, for types that cannot say `deny_unknown_fields` because they
/// are also records that later versions add fields to. Every field of
/// `parsed` serialises (no `skip_serializing_if`), so its keys are the
/// type's fields whatever the body left out.
pub(super) fn refuse_unknown_fields<T: serde::Serialize>(
    body: &Value,
    parsed: &T,
    shape: &str,
) -> Result<(), ApiError> {
    let known = serde_json::to_value(parsed).expect("serializable");
    let unknown: Vec<&str> = (body.as_object().into_iter().flatten())
        .map(|(k, _)| k.as_str())
        .filter(|k| known.get(k).is_none())
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(ApiError(Error::invalid(format!(
        "the request body has unknown field(s) {} (expected {shape})",
        unknown.join(", ")
    ))))
}

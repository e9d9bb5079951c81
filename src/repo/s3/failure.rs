//! What a failed request means: retried, or a definite answer, and then
//! what to fix.
//!
//! Read from structured sources first: object_store's error variants
//! (made from the HTTP status: `NotFound` 404, `PermissionDenied` 403,
//! `Unauthenticated` 401, `AlreadyExists` 409, `Precondition` 412,
//! `NotModified` 304). A LIST or a DeleteObjects, and any other status,
//! comes as a generic error whose only record of the status is its text
//! (object_store's `RetryError`, which has it, is not public): the
//! status is then read from the text, as a fallback. The S3 error code
//! (`NoSuchBucket`, `InvalidAccessKeyId`, ...) is only in the answer's
//! body, which object_store gives as text. No status at all is no
//! answer (a connection refused or reset, a timeout): retried.

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

use super::{error_text, map_err};
use crate::error::{Error, ErrorKind};
use crate::repo::backend::Misconfigured;

/// What turns a failed request into a message that says what to fix.
#[derive(Default)]
pub struct Hints {
    pub bucket: String,
    /// Where credentials are asked for when none are given: the EC2
    /// instance metadata endpoint (`None`: credentials were given).
    pub metadata: Option<String>,
    /// The store's address, for messages (`None`: not known).
    pub endpoint: Option<String>,
}

/// What a failed request means.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// A 5xx, 408, 429, a timeout or a connection failure: may pass.
    Transient,
    /// `NoSuchBucket`.
    NoBucket,
    /// 401/403: a wrong key or secret, or a key without access.
    Denied,
    /// No credentials given, and the instance metadata service did not
    /// give any.
    NoCredentials,
    /// Any other definite answer (404, 409, 412, other 4xx).
    Final,
}

/// S3 error codes that say the key or its signature is refused, whatever
/// the status they come with.
const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
];

/// S3 error codes a store sends with a 4xx status for a failure that
/// passes (the AWS SDKs retry them): `RequestTimeout` comes as 400 when a
/// slow link did not carry a PUT's body in the store's time. Retried,
/// never taken for a configuration to fix.
const TRANSIENT_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    // A clock not yet synced after a power cut: passes once it is.
    "RequestTimeTooSkewed",
];

impl Hints {
    pub fn failure(&self, e: &object_store::Error) -> Failure {
        let text = error_text(e);
        // Credentials are asked of the metadata service inside the
        // request; its failure is known only by its address in the text.
        if let Some(m) = &self.metadata {
            if text.contains(m.trim_end_matches('/')) {
                return Failure::NoCredentials;
            }
        }
        let code = s3_code(&text);
        let status = status_of(e).or_else(|| http_status(&text));
        if code == Some("NoSuchBucket") && matches!(status, None | Some(404)) {
            return Failure::NoBucket;
        }
        if code.is_some_and(|c| DENIED_CODES.contains(&c)) {
            return Failure::Denied;
        }
        if code.is_some_and(|c| TRANSIENT_CODES.contains(&c)) {
            return Failure::Transient;
        }
        match status {
            Some(401 | 403) => Failure::Denied,
            Some(408 | 429) => Failure::Transient,
            Some(s) if (300..500).contains(&s) => Failure::Final,
            Some(_) => Failure::Transient,
            None if matches!(e, object_store::Error::InvalidPath { .. }) => Failure::Final,
            // No answer: a connection refused or reset, a timeout.
            None => Failure::Transient,
        }
    }

    /// `e` as this crate's error, saying what to fix where it can.
    pub fn error(&self, what: &str, e: object_store::Error) -> Error {
        let bucket = &self.bucket;
        let text = error_text(&e);
        match self.failure(&e) {
            Failure::NoBucket => Misconfigured::error(
                match &self.endpoint {
                    Some(at) => format!("S3 bucket \"{bucket}\" does not exist at {at}"),
                    None => format!("S3 bucket \"{bucket}\" does not exist"),
                },
                format!(
                    "{what} answered NoSuchBucket (check the bucket in the repository URL and AWS_ENDPOINT_URL; a bucket these credentials cannot see is reported so too)"
                ),
            ),
            Failure::Denied => Error::new(
                ErrorKind::NotPermitted,
                format!(
                    "S3 {what}: access denied to bucket {bucket}: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that the key may read and write the bucket ({text})"
                ),
            ),
            Failure::NoCredentials => Error::new(
                ErrorKind::NotPermitted,
                format!(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, or AWS_CONTAINER_CREDENTIALS_RELATIVE_URI); without them they are asked of the EC2 instance metadata service at {}, which gave none (S3 {what}: {text})",
                    self.metadata.as_deref().unwrap_or_default()
                ),
            ),
            // A status object_store has no variant for (400: a wrong
            // region, an endpoint that is not S3): the store answered,
            // and will answer the same.
            Failure::Final if matches!(e, object_store::Error::Generic { .. }) => {
                // A region the store does not serve: say which setting.
                let hint = match s3_code(&text) {
                    Some("AuthorizationHeaderMalformed") => {
                        "check AWS_REGION: the store signs for another region (named in its answer): "
                    }
                    _ => "",
                };
                Misconfigured::error(format!("S3 {what}"), format!("{hint}{text}"))
            }
            Failure::Transient | Failure::Final => map_err(what, e),
        }
    }
}

/// The HTTP status object_store's variant for `e` stands for, if it has
/// one.
fn status_of(e: &object_store::Error) -> Option<u16> {
    use object_store::Error as E;
    Some(match e {
        E::NotFound { .. } => 404,
        E::PermissionDenied { .. } => 403,
        E::Unauthenticated { .. } => 401,
        E::AlreadyExists { .. } => 409,
        E::Precondition { .. } => 412,
        E::NotModified { .. } => 304,
        _ => return None,
    })
}

/// The HTTP status object_store's message gives (`... status code: 404
/// Not Found: ...`), if any.
pub fn http_status(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// The S3 error code of the answer's body (`<Code>NoSuchBucket</Code>`).
fn s3_code(text: &str) -> Option<&str> {
    let at = text.find("<Code>")? + "<Code>".len();
    let len = text[at..].find("</Code>")?;
    Some(&text[at..at + len])
}

/// Where object_store asks for credentials when the builder was given
/// none: the instance metadata endpoint, unless credentials (a key, web
/// identity, a container's) are configured or requests are not signed.
pub fn instance_metadata_endpoint(b: &AmazonS3Builder) -> Option<String> {
    let set = |k: AmazonS3ConfigKey| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
    let env = |k: &str| std::env::var_os(k).is_some();
    let given = set(AmazonS3ConfigKey::AccessKeyId)
        || set(AmazonS3ConfigKey::SecretAccessKey)
        || (env("AWS_WEB_IDENTITY_TOKEN_FILE") && env("AWS_ROLE_ARN"))
        || set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || (set(AmazonS3ConfigKey::ContainerCredentialsFullUri)
            && set(AmazonS3ConfigKey::ContainerAuthorizationTokenFile))
        || b.get_config_value(&AmazonS3ConfigKey::SkipSignature)
            .is_some_and(|v| v == "true");
    (!given).then(|| {
        b.get_config_value(&AmazonS3ConfigKey::MetadataEndpoint)
            .unwrap_or_else(|| "http://169.254.169.254".into())
    })
}

/// The store's address as requests go to it: `AWS_ENDPOINT_URL`, or AWS's
/// regional endpoint.
pub fn endpoint(b: &AmazonS3Builder) -> String {
    b.get_config_value(&AmazonS3ConfigKey::Endpoint)
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| {
            let region = b
                .get_config_value(&AmazonS3ConfigKey::Region)
                .unwrap_or_else(|| "us-east-1".into());
            format!("https://s3.{region}.amazonaws.com")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::Error as E;

    const NO_BUCKET: &str = "Error performing GET http://127.0.0.1:3900/backups/repo.json in 1ms - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>Bucket not found: backups</Message></Error>";

    fn hints() -> Hints {
        Hints {
            bucket: "backups".into(),
            metadata: Some("http://127.0.0.1:1".into()),
            endpoint: Some("http://127.0.0.1:3900".into()),
        }
    }

    fn generic(text: &str) -> E {
        E::Generic {
            store: "S3",
            source: text.to_string().into(),
        }
    }

    fn status(code: &str) -> String {
        format!("Error performing list request: Error performing GET http://127.0.0.1:3900/backups?list-type=2 in 1ms - Server returned non-2xx status code: {code}: ")
    }

    #[test]
    fn object_stores_variants_are_read_before_the_text() {
        let h = hints();
        let not_found = |body: &str| E::NotFound {
            path: "repo.json".into(),
            source: body.to_string().into(),
        };
        assert_eq!(h.failure(&not_found(NO_BUCKET)), Failure::NoBucket);
        // A 404 without the code (an object that is not there): its
        // variant decides, whatever status the text may seem to give.
        assert_eq!(
            h.failure(&not_found("status code: 503 Service Unavailable")),
            Failure::Final
        );
        for e in [
            E::PermissionDenied {
                path: "x".into(),
                source: "".into(),
            },
            E::Unauthenticated {
                path: "x".into(),
                source: "".into(),
            },
        ] {
            assert_eq!(h.failure(&e), Failure::Denied, "{e}");
        }
        for e in [
            E::Precondition {
                path: "x".into(),
                source: "".into(),
            },
            E::AlreadyExists {
                path: "x".into(),
                source: "".into(),
            },
            E::NotModified {
                path: "x".into(),
                source: "".into(),
            },
        ] {
            assert_eq!(h.failure(&e), Failure::Final, "{e}");
        }
    }

    #[test]
    fn a_generic_errors_status_and_code_are_read_from_its_text() {
        let h = hints();
        let listed_no_bucket = NO_BUCKET.replace("/repo.json", "?list-type=2");
        assert_eq!(h.failure(&generic(&listed_no_bucket)), Failure::NoBucket);
        assert_eq!(
            h.failure(&generic(&status("403 Forbidden"))),
            Failure::Denied
        );
        assert_eq!(
            h.failure(&generic(&status("401 Unauthorized"))),
            Failure::Denied
        );
        // The code says it whatever the status.
        let bad_key = status("400 Bad Request") + "<Error><Code>InvalidAccessKeyId</Code></Error>";
        assert_eq!(h.failure(&generic(&bad_key)), Failure::Denied);
        for s in [
            "500 Internal Server Error",
            "503 Service Unavailable",
            "429 Too Many Requests",
            "408 Request Timeout",
        ] {
            assert_eq!(h.failure(&generic(&status(s))), Failure::Transient, "{s}");
        }
        for s in [
            "400 Bad Request",
            "405 Method Not Allowed",
            "301 Moved Permanently",
        ] {
            assert_eq!(h.failure(&generic(&status(s))), Failure::Final, "{s}");
        }
        // A wrong region: the error names the setting.
        let region =
            status("400 Bad Request") + "<Error><Code>AuthorizationHeaderMalformed</Code></Error>";
        let e = h.error("GET repo.json", generic(&region)).to_string();
        assert!(e.contains("check AWS_REGION"), "{e}");
        // A slow link's PUT: 400 with a code that says it passes.
        let slow = status("400 Bad Request") + "<Error><Code>RequestTimeout</Code></Error>";
        assert_eq!(h.failure(&generic(&slow)), Failure::Transient);
    }

    /// A request that got no answer has no status: retried.
    #[test]
    fn no_answer_is_transient_and_no_credentials_are_named() {
        let h = hints();
        let refused = E::Generic {
            store: "S3",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        assert_eq!(h.failure(&refused), Failure::Transient);
        assert_eq!(h.failure(&generic("timed out")), Failure::Transient);
        let metadata =
            generic("Error performing GET http://127.0.0.1:1/latest/api/token - 403 Forbidden");
        assert_eq!(h.failure(&metadata), Failure::NoCredentials);
    }

    #[test]
    fn a_missing_bucket_and_a_refused_request_are_marked_as_misconfigured_and_an_outage_is_not() {
        let h = hints();
        let e = h.error("GET repo.json", generic(NO_BUCKET));
        assert_eq!(e.kind(), ErrorKind::Io, "a guest's read sees EIO: {e}");
        assert!(Misconfigured::is(&e), "{e}");
        assert!(
            e.to_string().starts_with(
                "S3 bucket \"backups\" does not exist at http://127.0.0.1:3900: GET repo.json answered NoSuchBucket"
            ),
            "{e}"
        );
        assert!(Misconfigured::is(&e.clone().context("open the repository")));
        let region =
            status("400 Bad Request") + "<Error><Code>AuthorizationHeaderMalformed</Code></Error>";
        assert!(Misconfigured::is(
            &h.error("GET repo.json", generic(&region))
        ));
        for transient in [
            generic(&status("503 Service Unavailable")),
            generic("timed out"),
        ] {
            let e = h.error("GET repo.json", transient);
            assert!(!Misconfigured::is(&e), "{e}");
            assert_eq!(e.kind(), ErrorKind::Io);
        }
        let denied = h.error("GET repo.json", generic(&status("403 Forbidden")));
        assert_eq!(denied.kind(), ErrorKind::NotPermitted);
        let absent = E::NotFound {
            path: "repo.json".into(),
            source: "".into(),
        };
        assert_eq!(h.error("GET repo.json", absent).kind(), ErrorKind::NotFound);
    }
}

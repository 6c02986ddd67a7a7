//! The proxy's error type and the one place where an error becomes a Docker-style reply
//! (shell).
//!
//! Replies are `{"message": "..."}` with `Content-Type: application/json`: the docker CLI
//! (20.10 and 28.x), docker-py and bollard all show the `message` field of such a body
//! ("Error response from daemon: ..."). The Go proxy answered `text/plain` (spec §1.6.1); clients
//! fall back to the raw text there, so JSON only reads better.

use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};

use crate::attach::AttachFailure;
use crate::body::{full, BodyError, ProxyBody};
use crate::docker::DockerError;
use crate::rewrite::RewriteError;
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Body(#[from] BodyError),
    /// A create or exec body that is not JSON (Go said `EOF` for an empty one, spec §2.5).
    #[error("{0}")]
    BadJson(String),
    #[error("{0}")]
    Rewrite(#[from] RewriteError),
    #[error("{0}")]
    Docker(#[from] DockerError),
    #[error("{0}")]
    Attach(#[from] AttachFailure),
    #[error("Docker switched protocols on a request that did not ask for it")]
    UnexpectedUpgrade,
}

impl ProxyError {
    /// The status a Docker client gets for this error.
    pub fn status(&self) -> StatusCode {
        let code = match self {
            ProxyError::Rewrite(e) => e.status(),
            ProxyError::Docker(e) => e.status(),
            ProxyError::Body(BodyError::TooLarge(_)) => 413,
            ProxyError::Body(BodyError::ReadRequest(_)) => 400,
            _ => 500,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// Turns any error into the reply the client sees. The connection is closed after it, like
/// every reply of this proxy.
pub(crate) fn error_response(err: &ProxyError) -> Response<ProxyBody> {
    json_error(err.status(), &err.to_string())
}

/// A `{"message": ...}` reply with this status.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = Bytes::from(error_body(message));
    let mut response = Response::new(full(body.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The JSON body of an error reply, newline-terminated as Docker's own are.
pub(crate) fn error_body(message: &str) -> Vec<u8> {
    let mut body = serde_json::json!({ "message": message })
        .to_string()
        .into_bytes();
    body.push(b'\n');
    body
}

/// The same reply as raw HTTP/1.1 bytes, for the raw hijack path where hyper is not involved.
pub(crate) fn raw_error_response(err: &ProxyError) -> Vec<u8> {
    let status = err.status();
    let body = error_body(&err.to_string());
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_docker_shaped() {
        let body = error_body("No such image: \"x\"");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["message"], "No such image: \"x\"");
        assert_eq!(body.last(), Some(&b'\n'));
    }

    #[test]
    fn raw_error_is_well_framed() {
        let err = ProxyError::from(UpstreamError::Connect {
            target: "unix:///nowhere".into(),
            source: io::ErrorKind::NotFound.into(),
        });
        let raw = String::from_utf8(raw_error_response(&err)).expect("utf8");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head");
        assert!(head.starts_with("HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("Could not connect to target"));
        assert!(body.contains("Cannot connect to the Docker daemon at unix:///nowhere"));
    }
}

//! Bodies on their way through (shell): they stream frame by frame unless a rewrite needs
//! them whole; then they are collected with a cap and re-framed with a fresh `Content-Length`
//! (spec §1.6.5). Depends on nothing else in the crate, so errors, the upstream and the
//! handlers can all use it.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

/// Request and response bodies in both directions: an `Incoming` streamed as it arrives, or
/// bytes a rewrite produced.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Largest create/exec/start body or inspect reply we collect in order to rewrite it.
pub(crate) const MAX_REWRITE_BODY: usize = 16 * 1024 * 1024;

/// Why a body could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the request body: {0}")]
    ReadRequest(String),
    #[error("reading Docker's reply: {0}")]
    ReadReply(String),
}

/// A body streamed frame by frame: each chunk of an events or logs stream is written (and
/// flushed by hyper) as soon as it arrives.
pub(crate) fn stream(body: Incoming) -> ProxyBody {
    body.boxed_unsync()
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Collects a request body we are about to rewrite, at most [`MAX_REWRITE_BODY`] bytes.
pub(crate) async fn collect_request(body: Incoming) -> Result<Bytes, BodyError> {
    match Limited::new(body, MAX_REWRITE_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge(MAX_REWRITE_BODY))
        }
        Err(e) => Err(BodyError::ReadRequest(e.to_string())),
    }
}

/// Collects a reply body from dockerd that we are about to rewrite.
pub(crate) async fn collect_reply(body: Incoming) -> Result<Bytes, BodyError> {
    match Limited::new(body, MAX_REWRITE_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(BodyError::ReadReply(e.to_string())),
    }
}

/// Frames a body we produced whole: exact `Content-Length`, no chunking.
pub(crate) fn set_content_length(headers: &mut HeaderMap, len: usize) {
    headers.remove(TRANSFER_ENCODING);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_replaces_chunking() {
        let mut headers = HeaderMap::new();
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        set_content_length(&mut headers, 12);
        assert!(!headers.contains_key(TRANSFER_ENCODING));
        assert_eq!(headers[CONTENT_LENGTH], "12");
    }
}

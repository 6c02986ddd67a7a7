//! Bodies and heads on their way through (shell): bodies stream frame by frame unless a
//! rewrite needs them whole, then they are collected with a cap and re-framed with a fresh
//! `Content-Length` (spec §1.6.5).

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::error::ProxyError;

/// Request and response bodies in both directions: an `Incoming` streamed as it arrives, or
/// bytes a rewrite produced.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// Largest create/exec/start body or inspect reply we collect in order to rewrite it.
pub(crate) const MAX_REWRITE_BODY: usize = 16 * 1024 * 1024;

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
pub(crate) async fn collect_request(body: Incoming) -> Result<Bytes, ProxyError> {
    match Limited::new(body, MAX_REWRITE_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge(MAX_REWRITE_BODY))
        }
        Err(e) => Err(ProxyError::ReadBody(e.to_string())),
    }
}

/// Collects a reply body from dockerd that we are about to rewrite.
pub(crate) async fn collect_reply(body: Incoming) -> Result<Bytes, ProxyError> {
    match Limited::new(body, MAX_REWRITE_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(ProxyError::ReadReply(e.to_string())),
    }
}

/// Frames a body we produced whole: exact `Content-Length`, no chunking.
pub(crate) fn set_content_length(headers: &mut HeaderMap, len: usize) {
    headers.remove(TRANSFER_ENCODING);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
}

/// Docker's reply as the client gets it: status, headers (original case, thanks to the
/// extensions hyper filled in) and reason phrase as Docker sent them. Every reply closes the
/// connection: the next request then arrives on a fresh connection, where the server peeks
/// its head again, so a raw attach from a client that reuses connections (docker-py 1.x) is
/// always seen.
pub(crate) fn downstream<B>(response: Response<B>, body: ProxyBody) -> Response<ProxyBody> {
    let (mut parts, _) = response.into_parts();
    close_after(&mut parts.headers);
    Response::from_parts(parts, body)
}

/// Drops Docker's connection-management headers and asks for a close after this reply.
pub(crate) fn close_after(headers: &mut HeaderMap) {
    headers.remove("keep-alive");
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
}

/// The value of one query parameter, percent-decoded (`name` of a create call).
pub(crate) fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(
            query_param(Some("name=web"), "name").as_deref(),
            Some("web")
        );
        assert_eq!(
            query_param(Some("platform=&name=%2Fa%20b+c"), "name").as_deref(),
            Some("/a b c")
        );
        assert_eq!(query_param(Some("name"), "name").as_deref(), Some(""));
        assert_eq!(query_param(Some("names=x"), "name"), None);
        assert_eq!(query_param(None, "name"), None);
        assert_eq!(
            query_param(Some("name=100%"), "name").as_deref(),
            Some("100%")
        );
        assert_eq!(query_param(Some("name=%4"), "name").as_deref(), Some("%4"));
        assert_eq!(
            query_param(Some("name=%zz"), "name").as_deref(),
            Some("%zz")
        );
    }

    #[test]
    fn content_length_replaces_chunking() {
        let mut headers = HeaderMap::new();
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        set_content_length(&mut headers, 12);
        assert!(!headers.contains_key(TRANSFER_ENCODING));
        assert_eq!(headers[CONTENT_LENGTH], "12");
    }
}

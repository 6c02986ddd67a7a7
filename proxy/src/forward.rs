//! Replies on their way back (shell): Docker's status and headers as they were, with the
//! connection closed after each reply; and the query parameters the handlers read.

use http::header::CONNECTION;
use http::{HeaderMap, HeaderValue, Response};

use crate::body::ProxyBody;
use crate::endpoint::percent_decode;

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
        (percent_decode(k, true) == key).then(|| percent_decode(v, true).into_owned())
    })
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
}

//! Which Docker API endpoint a request is for (pure, spec §1.5): the proxy intercepts only a few.
//!
//! Paths are matched percent-decoded, as dockerd routes them (Go's `URL.Path`, which
//! gorilla/mux matches): `/containers/%63reate` creates a container there, so it is a create
//! here too, or it would slip past the rewrite.

use std::borrow::Cow;

use http::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /containers/create`
    ContainerCreate,
    /// `POST /containers/{id}/start`
    ContainerStart { id: String },
    /// `POST /containers/{id}/restart`
    ContainerRestart { id: String },
    /// `GET /containers/{id}/json`
    ContainerInspect { id: String },
    /// `POST /containers/{id}/attach` (the hijacked stream, not `/attach/ws`)
    ContainerAttach { id: String },
    /// `POST /containers/{id}/exec`
    ExecCreate { id: String },
    /// `POST /exec/{id}/start`
    ExecStart { id: String },
    /// `GET /exec/{id}/json`
    ExecInspect { id: String },
    /// Everything else: passed through untouched.
    Other,
}

/// Classifies a request by method and URL path (no query), percent-decoded first. An optional
/// `/v<digits and dots>` prefix is ignored, `{id}` is one non-empty path segment, and the
/// whole path must match.
pub fn classify(method: &Method, path: &str) -> Endpoint {
    let decoded = percent_decode(path, false);
    let path = strip_version(&decoded);
    let Some(rest) = path.strip_prefix('/') else {
        return Endpoint::Other;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let post = *method == Method::POST;
    let get = *method == Method::GET;
    match segments.as_slice() {
        ["containers", "create"] if post => Endpoint::ContainerCreate,
        ["containers", id, action] if !id.is_empty() => {
            let id = (*id).to_string();
            match *action {
                "start" if post => Endpoint::ContainerStart { id },
                "restart" if post => Endpoint::ContainerRestart { id },
                "json" if get => Endpoint::ContainerInspect { id },
                "attach" if post => Endpoint::ContainerAttach { id },
                "exec" if post => Endpoint::ExecCreate { id },
                _ => Endpoint::Other,
            }
        }
        ["exec", id, action] if !id.is_empty() => {
            let id = (*id).to_string();
            match *action {
                "start" if post => Endpoint::ExecStart { id },
                "json" if get => Endpoint::ExecInspect { id },
                _ => Endpoint::Other,
            }
        }
        _ => Endpoint::Other,
    }
}

/// Drops a leading `/v[0-9.]*` when a `/` follows it, like Weave's `^(/v[0-9\.]*)?` prefix.
fn strip_version(path: &str) -> &str {
    if let Some(after_v) = path.strip_prefix("/v") {
        let rest = after_v.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        if rest.starts_with('/') {
            return rest;
        }
    }
    path
}

/// Decodes every `%XX` (and, in a query, `+` as a space); a `%` not followed by two hex digits
/// stays as it is. Bytes that are not UTF-8 become U+FFFD.
pub(crate) fn percent_decode(s: &str, plus_as_space: bool) -> Cow<'_, str> {
    let special = s.contains('%') || (plus_as_space && s.contains('+'));
    if !special {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_as_space => out.push(b' '),
            b'%' => match bytes.get(i + 1..i + 3).and_then(hex_byte) {
                Some(byte) => {
                    out.push(byte);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |b: u8| char::from(b).to_digit(16);
    match two {
        [hi, lo] => u8::try_from(digit(*hi)? * 16 + digit(*lo)?).ok(),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;

    fn id(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn table() {
        use Endpoint::*;
        let post = Method::POST;
        let get = Method::GET;
        let cases: Vec<(&Method, &str, Endpoint)> = vec![
            (&post, "/containers/create", ContainerCreate),
            (&post, "/v1.41/containers/create", ContainerCreate),
            (&post, "/v1.15/containers/create", ContainerCreate),
            (&post, "/v1/containers/create", ContainerCreate),
            (&post, "/v/containers/create", ContainerCreate),
            (&post, "/v1.44.1/containers/create", ContainerCreate),
            (&get, "/containers/create", Other),
            (&post, "/containers/create/", Other),
            (&post, "/containers/createx", Other),
            (&post, "/x/containers/create", Other),
            (&post, "/vx/containers/create", Other),
            (&post, "/v1.41containers/create", Other),
            (&post, "containers/create", Other),
            (&post, "/v1.41/v1.41/containers/create", Other),
            (
                &post,
                "/v1.15/containers/abc/start",
                ContainerStart { id: id("abc") },
            ),
            (
                &post,
                "/containers/abc/start",
                ContainerStart { id: id("abc") },
            ),
            (
                &post,
                "/containers/my-app.v2_1/start",
                ContainerStart {
                    id: id("my-app.v2_1"),
                },
            ),
            (
                &post,
                "/containers/create/start",
                ContainerStart { id: id("create") },
            ),
            (&post, "/containers/abc/start/", Other),
            (&post, "/containers/abc/startx", Other),
            (&post, "/containers//start", Other),
            (&post, "/containers/a/b/start", Other),
            (&get, "/containers/abc/start", Other),
            (
                &post,
                "/v1.24/containers/f00d/restart",
                ContainerRestart { id: id("f00d") },
            ),
            (
                &get,
                "/containers/abc/json",
                ContainerInspect { id: id("abc") },
            ),
            (
                &get,
                "/v1.41/containers/web.1/json",
                ContainerInspect { id: id("web.1") },
            ),
            (&get, "/containers/json", Other),
            (&post, "/containers/abc/json", Other),
            (
                &post,
                "/containers/abc/attach",
                ContainerAttach { id: id("abc") },
            ),
            (
                &post,
                "/v1.43/containers/abc/attach",
                ContainerAttach { id: id("abc") },
            ),
            (&get, "/containers/abc/attach/ws", Other),
            (&post, "/containers/abc/attach/ws", Other),
            (&post, "/containers/abc/exec", ExecCreate { id: id("abc") }),
            (
                &post,
                "/v1.41/containers/a-b/exec",
                ExecCreate { id: id("a-b") },
            ),
            (&post, "/exec/e1/start", ExecStart { id: id("e1") }),
            (&post, "/v1.41/exec/e1/start", ExecStart { id: id("e1") }),
            (&post, "/exec/e1/resize", Other),
            (&get, "/exec/e1/json", ExecInspect { id: id("e1") }),
            (&get, "/v1.22/exec/e1/json", ExecInspect { id: id("e1") }),
            (&get, "/exec/e1/json/x", Other),
            (&post, "/containers/abc/logs", Other),
            (&get, "/_ping", Other),
            (&get, "/v1.41/version", Other),
            (&get, "/events", Other),
            (&post, "/build", Other),
            (&get, "", Other),
            (&get, "/", Other),
            // Percent-decoded first, as dockerd's router sees them.
            (&post, "/v1.41/containers/%63reate", ContainerCreate),
            (&post, "/containers/%63%72%65%61%74%65", ContainerCreate),
            (&post, "/%761.41/containers/create", ContainerCreate),
            (&post, "/containers%2Fcreate", ContainerCreate),
            (&post, "/v1.41%2Fcontainers/create", ContainerCreate),
            (
                &post,
                "/containers/abc/st%61rt",
                ContainerStart { id: id("abc") },
            ),
            (
                &post,
                "/containers/%61bc/start",
                ContainerStart { id: id("abc") },
            ),
            (
                &post,
                "/v1.41/containers/c1/%61ttach",
                ContainerAttach { id: id("c1") },
            ),
            (&post, "/exec/e1/st%41rt", Other),
            (&post, "/containers/a%2Fb/start", Other),
            (
                &post,
                "/containers/%zz/start",
                ContainerStart { id: id("%zz") },
            ),
            (&post, "/containers/create%", Other),
            (&post, "/containers/create+", Other),
        ];
        for (method, path, want) in cases {
            assert_eq!(classify(method, path), want, "{method} {path}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("/a%20b", false), "/a b");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("a+b", true), "a b");
        assert_eq!(percent_decode("%2f%2F", false), "//");
        assert_eq!(percent_decode("100%", false), "100%");
        assert_eq!(percent_decode("%4", false), "%4");
        assert_eq!(percent_decode("%zz%41", false), "%zzA");
        assert_eq!(percent_decode("%ff", false), "\u{fffd}");
        assert!(matches!(percent_decode("/plain", false), Cow::Borrowed(_)));
    }
}

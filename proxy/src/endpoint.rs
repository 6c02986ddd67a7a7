//! Which Docker API endpoint a request is for (pure, spec §1.5): the proxy intercepts only a few.

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

/// Classifies a request by method and URL path (no query). An optional `/v<digits and dots>`
/// prefix is ignored, `{id}` is one non-empty path segment, and the whole path must match.
pub fn classify(method: &Method, path: &str) -> Endpoint {
    let path = strip_version(path);
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
        ];
        for (method, path, want) in cases {
            assert_eq!(classify(method, path), want, "{method} {path}");
        }
    }
}

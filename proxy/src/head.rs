//! A pure HTTP/1 head codec on httparse, for the one case hyper cannot serve: a 200
//! "raw-stream" hijack of attach / exec start requested without an `Upgrade` header (old
//! clients such as docker-py 1.x and compose v1, spec §1.6.4).
//!
//! The server peeks the first request head of every connection ([`parse_request_head`]); if
//! [`RequestHead::wants_raw_hijack`] says so, the connection is relayed byte for byte, with the
//! head re-encoded by [`RequestHead::encode_for_upstream`] and Docker's reply head passed back
//! through [`fix_bare_lf`].

use http::Method;

use crate::endpoint::{classify, Endpoint};

/// Largest request or response head we buffer (X-Registry-Auth/-Config can be large).
pub const MAX_HEAD: usize = 256 * 1024;
/// More headers than this and we let hyper answer (it allows 100).
const MAX_HEADERS: usize = 128;

/// One header as it arrived: the name keeps its case, the value its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// The `y` of `HTTP/1.y`.
    pub minor_version: u8,
    pub headers: Vec<Header>,
    /// How many bytes of the buffer the head took, blank line included.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadParse {
    Complete(RequestHead),
    /// Read more bytes.
    Partial,
    /// Not something we understand: let hyper answer it.
    Invalid,
}

/// Parses the request head at the start of `buf`.
pub fn parse_request_head(buf: &[u8]) -> HeadParse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let (Some(method), Some(target), Some(minor_version)) =
                (request.method, request.path, request.version)
            else {
                return HeadParse::Invalid;
            };
            HeadParse::Complete(RequestHead {
                method: method.to_string(),
                target: target.to_string(),
                minor_version,
                headers: request
                    .headers
                    .iter()
                    .map(|h| Header {
                        name: h.name.to_string(),
                        value: h.value.to_vec(),
                    })
                    .collect(),
                len,
            })
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => HeadParse::Partial,
        Ok(httparse::Status::Partial) | Err(_) => HeadParse::Invalid,
    }
}

impl RequestHead {
    /// The path part of the target (no query).
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(path, _)| path)
    }

    /// The first value of this header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// A `POST` to attach or exec start without `Upgrade`: Docker answers `200 OK` and then
    /// takes the connection over, which hyper cannot follow. `logs` is never hijacked, even
    /// though it may carry the same raw-stream content types (spec §1.6 [modern]).
    pub fn wants_raw_hijack(&self) -> bool {
        let Ok(method) = Method::from_bytes(self.method.as_bytes()) else {
            return false;
        };
        method == Method::POST
            && matches!(
                classify(&method, self.path()),
                Endpoint::ContainerAttach { .. } | Endpoint::ExecStart { .. }
            )
            && self.header("upgrade").is_none()
    }

    /// The head to send to dockerd: request line and headers as they came (names keep their
    /// case), except that a `Host: /path` (old clients sent the socket path, which Go's HTTP
    /// server rejects) is blanked (spec §1.7), and `Connection` is replaced by
    /// `Connection: close` so that dockerd closes a reply it does not hijack (an error, say)
    /// instead of keeping a tunnel open that would bypass the proxy for the next request.
    pub fn encode_for_upstream(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len + 32);
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(format!(" HTTP/1.{}\r\n", self.minor_version).as_bytes());
        for h in &self.headers {
            if h.name.eq_ignore_ascii_case("connection")
                || h.name.eq_ignore_ascii_case("keep-alive")
            {
                continue;
            }
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            if !(h.name.eq_ignore_ascii_case("host") && h.value.starts_with(b"/")) {
                out.extend_from_slice(&h.value);
            }
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out
    }
}

/// Where a response head ends in `buf` (just past its blank line), accepting bare LFs.
pub fn response_head_end(buf: &[u8]) -> Option<usize> {
    let mut at_line_start = false;
    for (i, &byte) in buf.iter().enumerate() {
        match byte {
            b'\n' if at_line_start => return Some(i + 1),
            b'\n' => at_line_start = true,
            b'\r' => {}
            _ => at_line_start = false,
        }
    }
    None
}

/// Turns every LF not preceded by CR into CRLF (the Go proxy wrote bare LFs, spec §1.6).
pub fn fix_bare_lf(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 8);
    let mut previous = 0u8;
    for &byte in head {
        if byte == b'\n' && previous != b'\r' {
            out.push(b'\r');
        }
        out.push(byte);
        previous = byte;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(raw: &str) -> RequestHead {
        match parse_request_head(raw.as_bytes()) {
            HeadParse::Complete(head) => head,
            other => panic!("{raw:?} parsed as {other:?}"),
        }
    }

    const DOCKER_PY_ATTACH: &str =
        "POST /v1.21/containers/abc/attach?stdout=1&stderr=1&stream=1 HTTP/1.1\r\n\
        Host: /var/run/docker.sock\r\nConnection: keep-alive\r\nAccept-Encoding: gzip, deflate\r\n\
        Accept: */*\r\nUser-Agent: docker-py/1.10.6\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn parses_head_and_length() {
        let raw = format!("{DOCKER_PY_ATTACH}trailing");
        let h = head(&raw);
        assert_eq!(h.method, "POST");
        assert_eq!(h.path(), "/v1.21/containers/abc/attach");
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.len, DOCKER_PY_ATTACH.len());
        assert_eq!(h.header("user-agent"), Some(&b"docker-py/1.10.6"[..]));
    }

    #[test]
    fn partial_and_invalid() {
        assert_eq!(
            parse_request_head(b"POST /x HTTP/1.1\r\nHost: a"),
            HeadParse::Partial
        );
        assert_eq!(parse_request_head(b""), HeadParse::Partial);
        assert_eq!(
            parse_request_head(b"\x16\x03\x01garbage\r\n\r\n"),
            HeadParse::Invalid
        );
        let huge = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(parse_request_head(&huge), HeadParse::Invalid);
    }

    #[test]
    fn raw_hijack_only_for_attach_and_exec_start_without_upgrade() {
        let req = |method: &str, path: &str, extra: &str| {
            head(&format!(
                "{method} {path} HTTP/1.1\r\nHost: docker\r\n{extra}\r\n"
            ))
        };
        assert!(head(DOCKER_PY_ATTACH).wants_raw_hijack());
        assert!(req("POST", "/containers/abc/attach?stream=1", "").wants_raw_hijack());
        assert!(req("POST", "/v1.41/exec/e1/start", "").wants_raw_hijack());
        let upgrade = "Connection: Upgrade\r\nUpgrade: tcp\r\n";
        assert!(!req("POST", "/v1.41/containers/abc/attach", upgrade).wants_raw_hijack());
        assert!(!req("POST", "/v1.41/exec/e1/start", "upgrade: tcp\r\n").wants_raw_hijack());
        assert!(!req("GET", "/v1.41/containers/abc/logs?follow=1", "").wants_raw_hijack());
        assert!(!req("POST", "/v1.41/containers/abc/start", "").wants_raw_hijack());
        assert!(!req("POST", "/v1.41/containers/create", "").wants_raw_hijack());
        assert!(!req("GET", "/v1.41/containers/abc/attach/ws", "").wants_raw_hijack());
    }

    #[test]
    fn upstream_head_blanks_socket_host_and_closes() {
        let out = String::from_utf8(head(DOCKER_PY_ATTACH).encode_for_upstream()).expect("utf8");
        assert_eq!(
            out,
            "POST /v1.21/containers/abc/attach?stdout=1&stderr=1&stream=1 HTTP/1.1\r\n\
             Host: \r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\n\
             User-Agent: docker-py/1.10.6\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let normal = head("POST /exec/e/start HTTP/1.0\r\nhost: docker\r\nX-Mixed-Case: v\r\n\r\n");
        let out = String::from_utf8(normal.encode_for_upstream()).expect("utf8");
        assert_eq!(
            out,
            "POST /exec/e/start HTTP/1.0\r\nhost: docker\r\nX-Mixed-Case: v\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn response_head_end_accepts_crlf_and_bare_lf() {
        let crlf =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\nDATA";
        assert_eq!(response_head_end(crlf), Some(crlf.len() - 4));
        let lf = b"HTTP/1.1 200 OK\nContent-Type: x\n\nDATA";
        assert_eq!(response_head_end(lf), Some(lf.len() - 4));
        assert_eq!(response_head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n"), None);
    }

    #[test]
    fn bare_lf_becomes_crlf() {
        assert_eq!(
            fix_bare_lf(b"HTTP/1.1 200 OK\nA: b\r\n\n"),
            b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n".to_vec()
        );
        assert_eq!(fix_bare_lf(b"x\r\n"), b"x\r\n".to_vec());
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request_head(&bytes);
            let _ = response_head_end(&bytes);
        }

        #[test]
        fn fixed_heads_have_no_bare_lf(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let fixed = fix_bare_lf(&bytes);
            for (i, &b) in fixed.iter().enumerate() {
                if b == b'\n' {
                    prop_assert!(i > 0 && fixed[i - 1] == b'\r');
                }
            }
        }
    }
}

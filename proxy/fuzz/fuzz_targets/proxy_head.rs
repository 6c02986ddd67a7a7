//! The request-head codec of the raw hijack path.
//!
//! Invariants: a parsed head re-encodes (`encode_for_upstream`) to a head that parses to the
//! same method, target, version and headers, less `Connection`/`Keep-Alive`, with a
//! `Host: /path` blanked and `Connection: close` added, and whose length is exactly the
//! encoding; the hijack decision is the same for both. `fix_bare_lf` leaves no bare LF, only
//! adds CRs, and is idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weave_proxy::head::{fix_bare_lf, parse_request_head, response_head_end, HeadParse, Header};

fuzz_target!(|data: &[u8]| {
    check_head(data);
    check_fix_bare_lf(data);
});

fn check_head(data: &[u8]) {
    if let HeadParse::Complete(head) = parse_request_head(data) {
        assert!(head.len <= data.len());
        let mut want: Vec<Header> = head
            .headers
            .iter()
            .filter(|h| {
                !h.name.eq_ignore_ascii_case("connection")
                    && !h.name.eq_ignore_ascii_case("keep-alive")
            })
            .map(|h| Header {
                name: h.name.clone(),
                value: if h.name.eq_ignore_ascii_case("host") && h.value.starts_with(b"/") {
                    Vec::new()
                } else {
                    h.value.clone()
                },
            })
            .collect();
        want.push(Header {
            name: "Connection".into(),
            value: b"close".to_vec(),
        });
        // The parser takes at most 128 headers; dockerd, which gets the re-encoded head, has
        // no such limit, so one more (the added Connection) is fine but cannot be checked here.
        if want.len() > 128 {
            return;
        }
        let encoded = head.encode_for_upstream();
        let HeadParse::Complete(again) = parse_request_head(&encoded) else {
            panic!(
                "re-encoded head does not parse: {:?}",
                String::from_utf8_lossy(&encoded)
            );
        };
        assert_eq!(again.len, encoded.len());
        assert_eq!(
            (&again.method, &again.target, again.minor_version),
            (&head.method, &head.target, head.minor_version)
        );
        assert_eq!(again.headers, want);
        assert_eq!(again.wants_raw_hijack(), head.wants_raw_hijack());
        assert_eq!(again.path(), head.path());
    }
}

fn check_fix_bare_lf(data: &[u8]) {
    let fixed = fix_bare_lf(data);
    let mut previous = 0u8;
    for &b in &fixed {
        assert!(b != b'\n' || previous == b'\r', "bare LF left");
        previous = b;
    }
    assert_eq!(fix_bare_lf(&fixed), fixed);
    // Only CRs before LFs were added, one per bare LF.
    let bare = data
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' && (i == 0 || data[i - 1] != b'\r'))
        .count();
    assert_eq!(fixed.len(), data.len() + bare);
    assert_eq!(strip_cr_before_lf(&fixed), strip_cr_before_lf(data));
    if let Some(end) = response_head_end(data) {
        assert!(end <= data.len() && data[end - 1] == b'\n');
        assert!(
            response_head_end(&data[..end - 1]).is_none(),
            "the first blank line ends it"
        );
    }
}

fn strip_cr_before_lf(b: &[u8]) -> Vec<u8> {
    b.iter()
        .enumerate()
        .filter(|&(i, &c)| !(c == b'\r' && b.get(i + 1) == Some(&b'\n')))
        .map(|(_, &c)| c)
        .collect()
}

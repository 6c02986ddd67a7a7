//! `WEAVE_CIDR` parsing: whatever parses prints back (`Display` of each element, spaces
//! between) to a value that parses to the same addresses; `none` only ever alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use weave_proxy::cidr::{parse_weave_cidr, weave_cidr_from_env, WeaveCidr};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match parse_weave_cidr(Some(s)) {
        Ok(WeaveCidr::None) => assert_eq!(s.trim(), "none"),
        Ok(WeaveCidr::Addrs(specs)) => {
            assert!(!specs.is_empty());
            let printed: Vec<String> = specs.iter().map(ToString::to_string).collect();
            let again = parse_weave_cidr(Some(&printed.join(" ")));
            assert_eq!(again, Ok(WeaveCidr::Addrs(specs)), "printed as {printed:?}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // The same text as an Env list entry, after other variables.
    let env = vec![
        Value::from("PATH=/bin"),
        Value::from(format!("WEAVE_CIDR={s}")),
        Value::from("WEAVE_CIDR=x"),
    ];
    assert_eq!(weave_cidr_from_env(&env), Some(s));
});

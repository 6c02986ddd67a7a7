//! `WEAVE_CIDR` (pure): the container's requested weave addresses (spec §2.2).

use serde_json::Value;
use weave_api::addr::{AddrError, AddrSpec};

/// What a `WEAVE_CIDR` value asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeaveCidr {
    /// `WEAVE_CIDR=none`: keep the container off the weave network.
    None,
    /// These addresses, in the order given (never empty).
    Addrs(Vec<AddrSpec>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    // The cause is part of the message because HTTP clients only ever see the Display text.
    #[error("invalid WEAVE_CIDR {element:?}: {cause}")]
    InvalidElement { element: String, cause: AddrError },
    #[error(
        "invalid WEAVE_CIDR {value:?}: \"none\" must be the whole value, not one of several addresses"
    )]
    NoneAmongOthers { value: String },
}

/// Parses a `WEAVE_CIDR` value; `None` means the variable is not set.
///
/// A missing or blank value means `net:default`. `none` only counts when it is the whole value
/// (surrounding whitespace aside).
pub fn parse_weave_cidr(value: Option<&str>) -> Result<WeaveCidr, CidrError> {
    let Some(value) = value else {
        return Ok(WeaveCidr::Addrs(vec![AddrSpec::DefaultSubnet]));
    };
    if value.trim() == "none" {
        return Ok(WeaveCidr::None);
    }
    let mut specs = Vec::new();
    for element in value.split_whitespace() {
        if element == "none" {
            return Err(CidrError::NoneAmongOthers {
                value: value.to_string(),
            });
        }
        let spec = element
            .parse::<AddrSpec>()
            .map_err(|cause| CidrError::InvalidElement {
                element: element.to_string(),
                cause,
            })?;
        specs.push(spec);
    }
    if specs.is_empty() {
        specs.push(AddrSpec::DefaultSubnet);
    }
    Ok(WeaveCidr::Addrs(specs))
}

/// The value of the first `WEAVE_CIDR=` entry of a Docker `Env` list (`Some("")` for a bare
/// `WEAVE_CIDR=`), or `None` when there is none. Non-string entries are skipped.
pub fn weave_cidr_from_env(env: &[Value]) -> Option<&str> {
    env.iter()
        .filter_map(Value::as_str)
        .find_map(|entry| entry.strip_prefix("WEAVE_CIDR="))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn specs(value: &str) -> Vec<AddrSpec> {
        match parse_weave_cidr(Some(value)).unwrap() {
            WeaveCidr::Addrs(specs) => specs,
            WeaveCidr::None => panic!("{value:?} parsed as none"),
        }
    }

    #[test]
    fn missing_or_blank_means_default() {
        let default = WeaveCidr::Addrs(vec![AddrSpec::DefaultSubnet]);
        assert_eq!(parse_weave_cidr(None).unwrap(), default);
        assert_eq!(parse_weave_cidr(Some("")).unwrap(), default);
        assert_eq!(parse_weave_cidr(Some(" \t ")).unwrap(), default);
    }

    #[test]
    fn none_only_as_whole_value() {
        assert_eq!(parse_weave_cidr(Some("none")).unwrap(), WeaveCidr::None);
        assert_eq!(parse_weave_cidr(Some(" none ")).unwrap(), WeaveCidr::None);
        let err = parse_weave_cidr(Some("none 10.1.1.1/24")).unwrap_err();
        assert!(matches!(err, CidrError::NoneAmongOthers { .. }));
        assert!(err.to_string().contains("\"none 10.1.1.1/24\""), "{err}");
        assert!(parse_weave_cidr(Some("10.1.1.1/24 none")).is_err());
        assert!(parse_weave_cidr(Some("None")).is_err());
    }

    #[test]
    fn keeps_order_of_every_form() {
        let got = specs("10.2.1.1/24  ip:10.2.1.2/24\tnet:10.2.3.7/24 net:default");
        let text: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "10.2.1.1/24",
                "10.2.1.2/24",
                "net:10.2.3.0/24",
                "net:default"
            ]
        );
    }

    #[test]
    fn error_names_offending_element() {
        let err = parse_weave_cidr(Some("10.1.1.1/24 10.1.1/24")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("invalid WEAVE_CIDR \"10.1.1/24\": "),
            "{text}"
        );
        let err = parse_weave_cidr(Some("foo")).unwrap_err();
        assert!(err.to_string().starts_with("invalid WEAVE_CIDR \"foo\": "));
    }

    #[test]
    fn first_env_entry_wins() {
        let env = json!(["A=1", 7, "WEAVE_CIDR=10.1.1.1/24", "WEAVE_CIDR=none"]);
        let env = env.as_array().unwrap();
        assert_eq!(weave_cidr_from_env(env), Some("10.1.1.1/24"));
        assert_eq!(
            weave_cidr_from_env(json!(["WEAVE_CIDR="]).as_array().unwrap()),
            Some("")
        );
        assert_eq!(
            weave_cidr_from_env(
                json!(["WEAVE_CIDRX=1", "X=WEAVE_CIDR=1"])
                    .as_array()
                    .unwrap()
            ),
            None
        );
        assert_eq!(weave_cidr_from_env(&[]), None);
    }

    fn any_spec() -> impl Strategy<Value = AddrSpec> {
        use weave_api::addr::Ipv4Cidr;
        (any::<u32>(), 0u8..=32, 0u8..3).prop_map(|(ip, len, kind)| {
            let cidr = Ipv4Cidr {
                addr: ip.into(),
                prefix_len: len,
            };
            match kind {
                0 => AddrSpec::Explicit(cidr),
                1 => AddrSpec::Subnet(cidr.network()),
                _ => AddrSpec::DefaultSubnet,
            }
        })
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = parse_weave_cidr(Some(&s));
        }

        #[test]
        fn joined_display_round_trips(
            list in proptest::collection::vec(any_spec(), 1..6),
            sep in "[ \t\n]{1,3}",
        ) {
            let text: Vec<String> = list.iter().map(ToString::to_string).collect();
            let value = text.join(&sep);
            prop_assert_eq!(parse_weave_cidr(Some(&value)), Ok(WeaveCidr::Addrs(list)));
        }
    }
}

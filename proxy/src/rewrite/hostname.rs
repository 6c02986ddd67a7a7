//! Hostname derivation for woven containers (pure, spec §2.4): the container name or a label,
//! passed through `--hostname-match` / `--hostname-replacement`.

use regex::Regex;
use serde_json::Value;

use crate::rewrite::RewriteError;

/// `--hostname-from-label`, `--hostname-match` and `--hostname-replacement`.
#[derive(Debug, Clone)]
pub struct HostnameRule {
    matcher: Regex,
    replacement: String,
    from_label: Option<String>,
}

impl HostnameRule {
    /// `replacement` uses `$1`, `$name` and `${name}` like Go's `Regexp.Expand`, which is also the
    /// syntax of `regex::Regex::replace_all`. An empty `from_label` means "no label".
    pub fn new(
        matcher: &str,
        replacement: &str,
        from_label: Option<&str>,
    ) -> Result<Self, regex::Error> {
        Ok(Self {
            matcher: Regex::new(matcher)?,
            replacement: replacement.to_string(),
            from_label: from_label.filter(|l| !l.is_empty()).map(str::to_string),
        })
    }

    /// The name to use as hostname, "" when there is none. `name` is the `name` query parameter
    /// of the create call; `labels` the body's `Labels` (missing, null or an object).
    pub fn derive(
        &self,
        name: Option<&str>,
        labels: Option<&Value>,
    ) -> Result<String, RewriteError> {
        let name = name.unwrap_or("");
        // Docker accepts `--name /foo` and reports names with a leading slash; a hostname has none.
        let mut source = name.strip_prefix('/').unwrap_or(name);
        if let Some(key) = &self.from_label {
            if let Some(value) = label(labels, key)? {
                if !value.is_empty() {
                    source = value;
                }
            }
        }
        Ok(self
            .matcher
            .replace_all(source, self.replacement.as_str())
            .into_owned())
    }
}

impl Default for HostnameRule {
    /// The identity: `(.*)` → `$1`, no label.
    fn default() -> Self {
        Self {
            matcher: Regex::new("(.*)").expect("constant regex is valid"),
            replacement: "$1".to_string(),
            from_label: None,
        }
    }
}

fn label<'a>(labels: Option<&'a Value>, key: &str) -> Result<Option<&'a str>, RewriteError> {
    let labels = match labels {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(RewriteError::wrong_type("Labels", "object", other)),
    };
    match labels.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(RewriteError::wrong_type(key, "string", other)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on bad fixtures
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(m: &str, r: &str, l: Option<&str>) -> HostnameRule {
        HostnameRule::new(m, r, l).unwrap()
    }

    #[test]
    fn default_is_identity() {
        let r = HostnameRule::default();
        assert_eq!(r.derive(Some("abc"), None).unwrap(), "abc");
        assert_eq!(r.derive(Some(""), None).unwrap(), "");
        assert_eq!(r.derive(None, None).unwrap(), "");
        assert_eq!(r.derive(Some("/web-1.x"), None).unwrap(), "web-1.x");
        let explicit = rule("(.*)", "$1", None);
        assert_eq!(explicit.derive(Some("abc"), None).unwrap(), "abc");
    }

    #[test]
    fn go_compatible_replace_all() {
        // Go: regexp.MustCompile("x*").ReplaceAllString("abc", "-") == "-a-b-c-"
        assert_eq!(
            rule("x*", "-", None).derive(Some("abc"), None).unwrap(),
            "-a-b-c-"
        );
        assert_eq!(
            rule("b", "$1", None).derive(Some("abc"), None).unwrap(),
            "ac"
        );
    }

    #[test]
    fn named_groups_like_test_680() {
        // weave launch --hostname-match '^aaa-(?P<name>.*)-bbb$' --hostname-replacement '${name}'
        let r = rule("^aaa-(?P<name>.*)-bbb$", "${name}", None);
        assert_eq!(r.derive(Some("aaa-seeone-bbb"), None).unwrap(), "seeone");
        assert_eq!(r.derive(Some("/aaa-x-bbb"), None).unwrap(), "x");
        // Names that do not match stay as they are.
        assert_eq!(r.derive(Some("other"), None).unwrap(), "other");
        let r = rule("^aaa-(?P<name>.*)-bbb$", "$name", None);
        assert_eq!(r.derive(Some("aaa-two-bbb"), None).unwrap(), "two");
        let r = rule("^(.*)-(.*)$", "$2-$1", None);
        assert_eq!(r.derive(Some("a-b"), None).unwrap(), "b-a");
    }

    #[test]
    fn label_wins_when_non_empty() {
        let r = rule("(.*)", "$1", Some("hostname"));
        let labels = json!({"hostname": "fromlabel", "x": 1});
        assert_eq!(r.derive(Some("name"), Some(&labels)).unwrap(), "fromlabel");
        let empty = json!({"hostname": ""});
        assert_eq!(r.derive(Some("name"), Some(&empty)).unwrap(), "name");
        assert_eq!(r.derive(Some("name"), Some(&json!({}))).unwrap(), "name");
        assert_eq!(r.derive(Some("name"), Some(&Value::Null)).unwrap(), "name");
        assert_eq!(r.derive(Some("name"), None).unwrap(), "name");
        let r = rule("^aaa-(.*)$", "$1", Some("hostname"));
        let labels = json!({"hostname": "aaa-lbl"});
        assert_eq!(r.derive(None, Some(&labels)).unwrap(), "lbl");
    }

    #[test]
    fn empty_label_key_means_no_label() {
        let r = rule("(.*)", "$1", Some(""));
        let labels = json!({"": "x"});
        assert_eq!(r.derive(Some("name"), Some(&labels)).unwrap(), "name");
    }

    #[test]
    fn bad_labels_are_errors() {
        let r = rule("(.*)", "$1", Some("hostname"));
        let err = r.derive(Some("n"), Some(&json!(["a"]))).unwrap_err();
        assert_eq!(err.status(), 500);
        assert!(err.to_string().contains("Labels"), "{err}");
        let err = r
            .derive(Some("n"), Some(&json!({"hostname": 5})))
            .unwrap_err();
        assert!(err.to_string().contains("hostname"), "{err}");
        // Without a label rule the labels are not looked at.
        assert!(HostnameRule::default()
            .derive(Some("n"), Some(&json!(5)))
            .is_ok());
    }

    #[test]
    fn bad_regex_is_rejected() {
        assert!(HostnameRule::new("(", "$1", None).is_err());
    }
}

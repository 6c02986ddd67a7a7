//! `weave status`, `weave report`, `weave version`.

use anyhow::{anyhow, Result};
use serde_json::Value;
use weave_api::client::RouterClient;

use super::{router_unreachable, Exit};

const SUB_COMMANDS: [&str; 5] = ["targets", "connections", "peers", "dns", "ipam"];

pub async fn status(router: &RouterClient, sub: Option<&str>) -> Result<()> {
    let path = match sub {
        None => "/status".to_string(),
        Some(sub) if SUB_COMMANDS.contains(&sub) => format!("/status/{sub}"),
        Some(other) => {
            return Err(Exit::new(
                1,
                format!(
                    "Invalid 'weave status' sub-command: {other}\nusage: weave status [{}]",
                    SUB_COMMANDS.join("|")
                ),
            )
            .into())
        }
    };
    let text = match router.get_text(&path).await {
        Ok(text) => text,
        // A part that is off (`ipam` with --ipalloc-range "", `dns`): nothing to show.
        Err(weave_api::client::ClientError::Status { status: 404, .. }) if sub.is_some() => {
            return Ok(())
        }
        Err(e) => return Err(router_unreachable(e).await),
    };
    if sub.is_none() {
        println!();
        println!("{}", text.trim_end());
        println!();
    } else {
        print!("{text}");
    }
    Ok(())
}

pub async fn report(router: &RouterClient, format: Option<&str>) -> Result<()> {
    let report = match router.report().await {
        Ok(report) => report,
        Err(e) => return Err(router_unreachable(e).await),
    };
    match format {
        None => println!("{}", serde_json::to_string_pretty(&report)?),
        Some(template) => println!("{}", render_template(template, &report)?),
    }
    Ok(())
}

pub async fn version(router: &RouterClient) -> Result<()> {
    println!("weave script {}", env!("CARGO_PKG_VERSION"));
    match router.report().await {
        Ok(report) => match report.get("Version").and_then(Value::as_str) {
            Some(v) => println!("weave router {v}"),
            None => println!("weave router unknown"),
        },
        Err(_) => println!("weave router not running"),
    }
    Ok(())
}

/// The subset of Go templates that Weave's tests and users apply to `weave report`:
/// `{{.A.B}}`, `{{len .A.B}}` and `{{json .A}}`, with literal text around them.
fn render_template(template: &str, data: &Value) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| anyhow!("template: unclosed action in {template:?}"))?;
        out.push_str(&eval_action(after[..end].trim(), data)?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn eval_action(action: &str, data: &Value) -> Result<String> {
    let (func, path) = match action.split_once(char::is_whitespace) {
        Some((func, path)) => (Some(func), path.trim()),
        None => (None, action),
    };
    let value = lookup(path, data)?;
    match func {
        None => Ok(match value {
            Value::String(s) => s.clone(),
            Value::Null => "<no value>".into(),
            other => other.to_string(),
        }),
        Some("len") => match value {
            Value::Array(a) => Ok(a.len().to_string()),
            Value::Object(o) => Ok(o.len().to_string()),
            Value::String(s) => Ok(s.len().to_string()),
            Value::Null => Ok("0".into()),
            _ => Err(anyhow!("template: len of {path} is not defined")),
        },
        Some("json") => Ok(serde_json::to_string(value)?),
        Some(other) => Err(anyhow!("template: function {other:?} not defined")),
    }
}

fn lookup<'a>(path: &str, data: &'a Value) -> Result<&'a Value> {
    if path == "." {
        return Ok(data);
    }
    let fields = path
        .strip_prefix('.')
        .ok_or_else(|| anyhow!("template: expected a field like .Router.Name, got {path:?}"))?;
    let mut value = data;
    for field in fields.split('.') {
        value = value.get(field).unwrap_or(&Value::Null);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::render_template;
    use serde_json::json;

    #[test]
    fn renders_the_template_subset() {
        let report = json!({"Version": "0.1.0", "Router": {"Name": "aa:bb", "Peers": [1, 2]}, "DNS": {"Domain": "weave.local."}});
        let r = |t: &str| render_template(t, &report).expect("valid template");
        assert_eq!(r("{{.Router.Name}}"), "aa:bb");
        assert_eq!(r("{{ .Version }}"), "0.1.0");
        assert_eq!(r("peers: {{len .Router.Peers}}!"), "peers: 2!");
        assert_eq!(r("{{json .DNS}}"), r#"{"Domain":"weave.local."}"#);
        assert_eq!(r("{{.Nope.Deeper}}"), "<no value>");
        assert!(render_template("{{.Router.Name", &report).is_err());
        assert!(render_template("{{printf .X}}", &report).is_err());
    }
}

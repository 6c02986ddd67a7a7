//! `weave env`, `weave env --restore`, `weave config`: point the docker client at the proxy.

use anyhow::Result;
use weave_api::client::RouterClient;

use super::Exit;

/// The proxy's first address, or None when the router or proxy is not running.
async fn proxy_address(router: &RouterClient) -> Option<String> {
    let text = router.get_text("/proxyaddrs").await.ok()?;
    let first = text.lines().next()?.trim();
    (!first.is_empty()).then(|| first.replace("0.0.0.0", "127.0.0.1"))
}

pub async fn env(router: &RouterClient, restore: bool) -> Result<()> {
    if restore {
        return match std::env::var("ORIG_DOCKER_HOST") {
            Ok(orig) => {
                println!("DOCKER_HOST={orig}");
                Ok(())
            }
            Err(_) => Err(Exit::new(
                1,
                "Nothing to restore. This is most likely because there was no preceding invocation of 'eval $(weave env)' in this shell.",
            )
            .into()),
        };
    }
    let Some(addr) = proxy_address(router).await else {
        return Ok(());
    };
    println!(
        "{}",
        env_line(&addr, std::env::var("DOCKER_HOST").ok().as_deref())
    );
    Ok(())
}

pub async fn config(router: &RouterClient) -> Result<()> {
    match proxy_address(router).await {
        Some(addr) => {
            println!("-H={addr}");
            Ok(())
        }
        None => Err(Exit::new(1, "").into()),
    }
}

/// Keeps the user's original DOCKER_HOST so `--restore` can bring it back; when the shell
/// already points at the proxy the earlier ORIG_DOCKER_HOST is left as it is.
fn env_line(proxy: &str, current: Option<&str>) -> String {
    match current {
        Some(current) if current == proxy => format!("export DOCKER_HOST={proxy} "),
        current => format!(
            "export DOCKER_HOST={proxy} ORIG_DOCKER_HOST={}",
            current.unwrap_or("")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::env_line;

    #[test]
    fn env_lines() {
        let proxy = "unix:///var/run/weave/weave.sock";
        assert_eq!(
            env_line(proxy, None),
            "export DOCKER_HOST=unix:///var/run/weave/weave.sock ORIG_DOCKER_HOST="
        );
        assert_eq!(
            env_line(proxy, Some("tcp://127.0.0.1:2375")),
            "export DOCKER_HOST=unix:///var/run/weave/weave.sock ORIG_DOCKER_HOST=tcp://127.0.0.1:2375"
        );
        assert_eq!(
            env_line(proxy, Some(proxy)),
            "export DOCKER_HOST=unix:///var/run/weave/weave.sock "
        );
    }
}

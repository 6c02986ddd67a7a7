//! The proxy's own hardening, end to end: its socket has exactly the docker socket's owner and
//! mode (who may use dockerd may use the proxy, nobody else), and requests are intercepted on
//! the percent-decoded path, as dockerd routes them: a create sent as `/containers/%63reate`
//! is still woven.

use anyhow::{ensure, Result};
use weave_integration::{docker_ping, Host, DOCKER_SOCKET, PROXY_SOCKET};

fn owner_and_mode(h: &Host, path: &str) -> Result<String> {
    Ok(h.run("stat", ["-c", "%a %u %g %F", path])?
        .ok()?
        .stdout_trim()
        .to_string())
}

#[test]
fn proxy_socket_copies_docker_sockets_access_and_encoded_paths_are_intercepted() -> Result<()> {
    let host = Host::new()?;
    host.scenario(|h| {
        h.weave(["launch"])?.ok()?;
        docker_ping(&h.proxy_socket())?;

        let docker = owner_and_mode(h, DOCKER_SOCKET)?;
        let proxy = owner_and_mode(h, PROXY_SOCKET)?;
        println!("docker socket: {docker}; proxy socket: {proxy}");
        ensure!(docker.ends_with(" socket"), "{docker}");
        ensure!(
            proxy == docker,
            "the proxy socket ({proxy}) must have the docker socket's owner and mode ({docker})"
        );

        // Create and start with percent-encoded endpoint names: dockerd decodes them, so the
        // proxy must too, or the container would be created unwoven.
        let body =
            r#"{"Image":"busybox","Cmd":["sleep","100000"],"Env":["WEAVE_CIDR=10.35.1.9/24"]}"#;
        let curl = |method: &str, path: &str, data: &str| {
            h.run(
                "curl",
                [
                    "-sS",
                    "--unix-socket",
                    PROXY_SOCKET,
                    "-X",
                    method,
                    "-H",
                    "Content-Type: application/json",
                    "-w",
                    "\n%{http_code}",
                    "--data",
                    data,
                    &format!("http://docker{path}"),
                ],
            )?
            .ok()
        };
        let created = curl("POST", "/v1.41/containers/%63reate?name=pct-enc", body)?;
        ensure!(created.stdout.ends_with("\n201"), "create: {created}");
        let entrypoint = h
            .docker(["inspect", "-f", "{{json .Config.Entrypoint}}", "pct-enc"])?
            .ok()?;
        ensure!(
            entrypoint.stdout.contains("\"/w/w\""),
            "the create was not rewritten (entrypoint {})",
            entrypoint.stdout_trim()
        );
        let started = curl("POST", "/v1.41/containers/pct-enc/%73tart", "")?;
        ensure!(started.stdout.ends_with("\n204"), "start: {started}");
        // The start was intercepted too: the proxy attached the container before answering.
        let addrs = h
            .docker(["exec", "pct-enc", "ip", "-4", "-o", "addr", "show", "ethwe"])?
            .ok()?;
        ensure!(addrs.stdout.contains("10.35.1.9/24"), "ethwe: {addrs}");
        Ok(())
    })
}

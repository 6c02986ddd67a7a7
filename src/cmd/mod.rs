//! One module per command group. Each returns `anyhow::Result`; [`Exit`] carries a specific
//! exit status (Weave's script uses 3 for "already running").

pub mod container;
pub mod daemon;
pub mod env;
pub mod launch;
pub mod mesh;
pub mod status;
pub mod stop;

use std::fmt;

/// An error that should end the process with this status and message.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl Exit {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Explain an unreachable router the way Weave does: say whether the container is there.
pub async fn router_unreachable(err: weave_api::client::ClientError) -> anyhow::Error {
    if !matches!(err, weave_api::client::ClientError::Unreachable { .. }) {
        return err.into();
    }
    let Ok(docker) = crate::docker::connect().await else {
        return err.into();
    };
    match crate::docker::inspect(&docker, launch::ROUTER_CONTAINER).await {
        Ok(None) => Exit::new(1, "weave container is not present. Have you launched it?").into(),
        Ok(Some(c)) if !crate::docker::is_running(&c) => {
            Exit::new(1, "weave container is not running.").into()
        }
        _ => err.into(),
    }
}

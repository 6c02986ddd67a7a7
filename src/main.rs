//! `weave`: the command line, and (hidden subcommands) the router and proxy daemons that
//! `weave launch` runs in containers built from this same executable.

mod cli;
mod cmd;
mod docker;
mod image;
mod weavewait;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use weave_api::client::RouterClient;

use cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Router(_) | Command::Proxy(_));
    // Daemons log at info to their container's output (`docker logs weave`); the CLI only
    // speaks up for warnings.
    let default_level = if daemon { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEAVE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weave: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(dispatch(cli)) {
        match err.downcast_ref::<cmd::Exit>() {
            Some(exit) => {
                if !exit.message.is_empty() {
                    eprintln!("{}", exit.message);
                }
                std::process::exit(exit.code);
            }
            None => {
                eprintln!("weave: {err:#}");
                std::process::exit(1);
            }
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let router = RouterClient::new(cli.http_addr, cli.api_socket);
    match cli.command {
        Command::Launch(args) => cmd::launch::run(args, &router).await,
        Command::Stop => cmd::stop::stop().await,
        Command::Reset { force } => cmd::stop::reset(&router, force).await,
        Command::Env { restore } => cmd::env::env(&router, restore).await,
        Command::Config => cmd::env::config(&router).await,
        Command::Status { sub } => cmd::status::status(&router, sub.as_deref()).await,
        Command::Report { format } => cmd::status::report(&router, format.as_deref()).await,
        Command::Connect { replace, peers } => cmd::mesh::connect(&router, &peers, replace).await,
        Command::Forget { peers } => cmd::mesh::forget(&router, &peers).await,
        Command::Version => cmd::status::version(&router).await,
        Command::Prime => cmd::mesh::prime(&router).await,
        Command::Rmpeer { peers } => cmd::mesh::rmpeer(&router, &peers).await,
        Command::Ps { containers } => cmd::container::ps(&router, &containers).await,
        Command::Attach(args) => cmd::container::attach(&router, args).await,
        Command::Detach { args } => cmd::container::detach(&router, &args).await,
        Command::Expose { addrs, fqdn, .. } => {
            cmd::container::expose(&router, &addrs, fqdn.as_deref()).await
        }
        Command::Hide { addrs } => cmd::container::hide(&router, &addrs).await,
        Command::Run { args } => cmd::container::run(&router, &args).await,
        Command::Router(args) => cmd::daemon::router(args, router).await,
        Command::Proxy(args) => cmd::daemon::proxy(args, router).await,
    }
}

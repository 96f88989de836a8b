//! The `godel` binary: `serve` runs a node; every other command is a client
//! of the HTTP API.

use clap::Parser;

/// mimalloc: measured faster than glibc malloc on the request path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use godel::cli::{Cli, Command, run_client, run_serve};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => match run_serve(args).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("godel serve: {e:#}");
                1
            }
        },
        cmd => match run_client(&cli.api, cli.api_key, cli.ca_cert, cli.output, cmd).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("godel: {e:#}");
                2
            }
        },
    };
    std::process::exit(code);
}

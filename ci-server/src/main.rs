//! `ci-server`: parse settings, open the database, serve until Ctrl-C or
//! SIGTERM.

use std::process::ExitCode;

use ci_server::{Args, Server, ServerConfig};
use clap::Parser;

/// Exit code for missing or invalid settings.
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    ci_core::process::init_tracing();

    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => return fail(EXIT_CONFIG, &ci_core::process::one_line(&e.to_string())),
    };
    let config = match ServerConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let addr = config.addr;
    let server = match Server::open(config).await {
        Ok(s) => s,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => return fail(EXIT_CONFIG, &format!("cannot listen on {addr}: {e}")),
    };
    match server.serve(listener, ci_core::process::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e.to_string()),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("ci-server: {msg}");
    ExitCode::from(code)
}

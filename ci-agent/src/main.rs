//! `ci-agent`: parse settings, pick a runner, serve until Ctrl-C or SIGTERM.

use ci_agent::{Agent, AgentConfig, Args, Mode};
use clap::Parser;
use std::process::ExitCode;

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
    let config = match AgentConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let runner = match ci_agent::runner_for(&config).await {
        Ok(r) => r,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let (addr, mode) = (config.addr, config.mode);
    let agent = match Agent::new(config, runner) {
        Ok(a) => a,
        Err(e) => return fail(EXIT_CONFIG, &e.to_string()),
    };
    let served = match mode {
        Mode::Connect => agent.connect(ci_core::process::shutdown_signal()).await,
        Mode::Push => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => agent.serve(l, ci_core::process::shutdown_signal()).await,
            Err(e) => return fail(EXIT_CONFIG, &format!("cannot listen on {addr}: {e}")),
        },
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e.to_string()),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("ci-agent: {msg}");
    ExitCode::from(code)
}

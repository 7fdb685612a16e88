//! `ci-server`: parse settings, open the database, serve until Ctrl-C or
//! SIGTERM.

use std::process::ExitCode;

use ci_server::{Args, Server, ServerConfig};
use clap::Parser;

/// Exit code for missing or invalid settings.
const EXIT_CONFIG: u8 = 2;

// N.B.: few blocking threads. glibc gives each thread a malloc arena that
// keeps what was freed in it; with tokio's default of up to 512 blocking
// threads, SQLite work spread over dozens of them and forty readers of one
// large log took the peak RSS up by 60-70 MiB (tests/load.rs).
fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build();
    match runtime {
        Ok(rt) => rt.block_on(run()),
        Err(e) => fail(1, &format!("cannot start the runtime: {e}")),
    }
}

async fn run() -> ExitCode {
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
    let listener = match ci_server::listen::bind(addr) {
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

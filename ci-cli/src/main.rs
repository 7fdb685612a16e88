//! `ci`: parse arguments, run the command, exit 0, 1 (a waited-for build
//! did not succeed) or 2 (an error, printed on one line).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match ci_cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("ci: {}", ci_core::process::one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    match ci_cli::run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ci: {e}");
            ExitCode::from(2)
        }
    }
}

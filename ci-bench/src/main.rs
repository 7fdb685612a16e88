//! `ci-bench`: run the benchmark the README's figures come from.
//!
//! ```text
//! cargo run --release -p ci-bench -- --agents 16 --builds 5000
//! ```

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let opts = ci_bench::Opts::parse();
    match ci_bench::run(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ci-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

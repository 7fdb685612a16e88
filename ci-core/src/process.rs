//! Small pieces the `ci-server` and `ci-agent` binaries share.

/// Collapses a multi-line error message (such as clap's) into one line:
/// the lines before the usage section, trimmed and joined.
pub fn one_line(message: &str) -> String {
    let words: Vec<&str> = message
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    words.join(" ").trim_start_matches("error: ").to_owned()
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), in colour only
/// on a terminal.
#[cfg(feature = "cli")]
pub fn init_tracing() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line() {
        let clap = "error: the following required arguments were not provided:\n  --repo <REPO>\n\nUsage: ci-server --repo <REPO>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            super::one_line(clap),
            "the following required arguments were not provided: --repo <REPO>"
        );
        assert_eq!(super::one_line("plain"), "plain");
    }
}

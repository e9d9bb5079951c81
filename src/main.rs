//! The `recoverfs` binary: parse arguments, set up logging, run, and turn
//! any error into one line on stderr with a non-zero exit.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = recoverfs::cli::Cli::parse();
    use recoverfs::cli::Command;
    // Listing commands end quietly when their reader stops (`| head`), as
    // Unix tools do (Rust ignores SIGPIPE, and `println!` then panics).
    // The others keep it ignored: a write to a closed socket must be an
    // error they clean up after, never sudden death.
    if matches!(
        cli.command,
        Command::List { .. }
            | Command::Verify { .. }
            | Command::Status { .. }
            | Command::ExportPoints { .. }
    ) {
        // SAFETY: single-threaded at this point; restores the default
        // disposition of one signal.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // fuser logs replies that race an unmount as errors; ours are enough.
    let default = if matches!(cli.command, recoverfs::cli::Command::Serve { .. }) {
        "info,fuser=off"
    } else {
        "warn,fuser=off"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or the journal gets
        // plain lines an administrator can grep.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match recoverfs::cli::run(cli).map_err(anyhow::Error::from) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("recoverfs: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

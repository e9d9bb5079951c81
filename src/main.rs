//! The `recoverfs` binary: parse arguments, set up logging, run, and turn
//! any error into one line on stderr with a non-zero exit.

use std::io::Write;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = recoverfs::cli::Cli::parse();
    let serve = matches!(cli.command, recoverfs::cli::Command::Serve { .. });
    // fuser logs replies that race an unmount as errors; ours are enough.
    let default = if serve {
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
    if serve {
        // First thing: a SIGUSR2 during the start is noted and handed
        // over once the daemon is up, instead of killing it.
        recoverfs::daemon::defer_hand_over();
    }
    // Every command but the daemon ends quietly, as if killed by SIGPIPE,
    // when the reader of its output goes away (`| head`); SIGPIPE stays
    // ignored (see `end_quietly_when_stdout_closes`). The daemon's panics
    // stay loud whatever its stdout is.
    let r = match serve {
        true => recoverfs::cli::run(cli),
        false => recoverfs::cli::end_quietly_when_stdout_closes(|| recoverfs::cli::run(cli)),
    };
    match r.map_err(anyhow::Error::from) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: a closed terminal would turn the error's
            // exit status into a panic's (101).
            let _ = writeln!(std::io::stderr(), "recoverfs: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! The `mftd` binary: flags, logging, signals, then [`mftd::bind`] and [`mftd::run`].

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use mftd::config::{Args, Config};
use mftd::logging::{self, QueueWriter};

fn main() -> ExitCode {
    let args = Args::parse();
    let log = match logging::init(args.verbose) {
        Ok(w) => w,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "mftd: cannot start the logging thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = run(args, &log);
    // Lines still queued for a stderr that is stuck are given up after this.
    log.flush_within(logging::FLUSH_LIMIT);
    code
}

/// Everything after logging is set up. Its messages go through `log`:
/// `eprintln!` would panic on a closed stderr and block on a full one.
fn run(args: Args, log: &QueueWriter) -> ExitCode {
    if let Some(dir) = &args.manpage {
        use clap::CommandFactory;
        let mut buf = Vec::new();
        let page = std::fs::create_dir_all(dir)
            .and_then(|_| clap_mangen::Man::new(Args::command()).section("8").render(&mut buf))
            .and_then(|_| std::fs::write(dir.join("mftd.8"), &buf));
        return match page {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log.say(format_args!("mftd: cannot write the man page into {}: {e}", dir.display()));
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            log.say(format_args!("mftd: {e:#}"));
            return ExitCode::from(2);
        }
    };
    if args.print_node_id {
        return match mftd::node::NodeIdentity::load_or_create(&config.state_dir) {
            Ok(n) => {
                // A closed stdout is the reader's choice, not an error.
                let _ = writeln!(std::io::stdout(), "{}", n.id);
                ExitCode::SUCCESS
            }
            Err(e) => {
                log.say(format_args!("mftd: {e:#}"));
                ExitCode::FAILURE
            }
        };
    }
    if args.print_config {
        let _ = write!(std::io::stdout(), "{}", config.describe());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log.say(format_args!("mftd: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        // Handlers first: a signal while binding must not leave the socket.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let bound = mftd::bind(&config).await?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        };
        let reload_args = args.clone();
        let reloader: mftd::Reloader = Box::new(move || Config::load(&reload_args));
        mftd::run(config, bound, shutdown, Some(reloader)).await
    });
    // Tasks that ignored the grace period must not hold up the exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log.say(format_args!("mftd: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

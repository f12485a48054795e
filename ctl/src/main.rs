//! `mftctl`: drives a running `mftd` over its control socket.
//!
//! Every failure prints one sentence a person can act on and exits non-zero
//! (1 for errors, 2 for bad usage). With `--json`, stdout carries only JSON:
//! one object per line.

mod client;
mod display;
mod shown;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use mftd_common::control::{Event, GetRequest, Request, Response};
use mftd_common::rate::parse_rate;

use client::{Client, CtlError};
use display::{err, out};
use shown::Shown;

#[derive(Debug, Parser)]
#[command(name = "mftctl", version, about = "Control a running mftd")]
struct Cli {
    /// Control socket of the daemon (default: as mftd's; env MFTD_SOCKET).
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Machine-readable JSON on stdout, one object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Daemon, listeners and downloads at a glance.
    Status,
    /// Manage transfer listeners.
    #[command(subcommand)]
    Servers(ServersCmd),
    /// Download a file from one or more servers.
    Get(Box<GetArgs>),
    /// Inspect and manage downloads.
    #[command(subcommand)]
    Downloads(DownloadsCmd),
    /// Stop the daemon.
    Shutdown,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write man pages for mftctl into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
enum ServersCmd {
    /// Port, state, connections, bytes sent, current rate and limit of each listener.
    List,
    /// Close a listener and its connections (clients fail over to other servers).
    Stop { port: u16 },
    /// Reopen a stopped listener.
    Start { port: u16 },
    /// Close a listener and forget it (until mftd restarts or reloads).
    Remove { port: u16 },
    /// Open a new listener.
    Add {
        /// Port to listen on (default: any free port).
        #[arg(long)]
        port: Option<u16>,
        /// Bandwidth cap, bytes/s with K/M/G suffix (0 = none).
        #[arg(long, value_parser = parse_rate, value_name = "RATE")]
        rate_limit: Option<u64>,
        /// Plain TCP instead of TLS (unencrypted: trusted networks only).
        #[arg(long)]
        plain: bool,
    },
    /// Change a listener's bandwidth cap (0 = none).
    Limit {
        port: u16,
        #[arg(value_parser = parse_rate, value_name = "RATE")]
        rate: u64,
    },
}

#[derive(Debug, Subcommand)]
enum DownloadsCmd {
    /// All downloads of this daemon run.
    List,
    /// One download with per-source detail.
    Show { id: u64 },
    /// Follow a running download's live progress (Ctrl-C detaches).
    Watch {
        id: u64,
        /// Seconds between updates.
        #[arg(long, default_value_t = 1.0, value_name = "SECS")]
        interval: f64,
    },
    /// Stop a download, keeping its data and progress for later.
    Pause { id: u64 },
    /// Continue a paused download.
    Resume { id: u64 },
    /// Stop a download and remove its partial file.
    Cancel { id: u64 },
    /// Take an ended download off the list (a failed one's kept data too).
    Remove { id: u64 },
    /// Take every ended download off the list (failed ones with data kept
    /// for a retry stay).
    Purge,
    /// Add sources to a download (a running one uses them at once).
    AddSource {
        id: u64,
        /// HOST:PORT of each new source; separate with spaces or commas.
        #[arg(required = true, value_delimiter = ',', value_name = "HOST:PORT")]
        sources: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
struct GetArgs {
    /// Path of the file on the servers, relative to their export directory.
    #[arg(required_unless_present_any = ["resume", "input_file"])]
    remote_path: Option<String>,
    /// Download every file listed in FILE (one remote path per line; blank
    /// lines and lines starting with # are skipped), one after another
    /// from the same sources ("-" reads standard input).
    #[arg(short = 'i', long = "input-file", value_name = "FILE",
          conflicts_with_all = ["remote_path", "resume", "output_name"])]
    input_file: Option<PathBuf>,
    /// Continue interrupted downloads: all of them, or the one with this ID.
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "all",
          conflicts_with_all = ["from", "host", "ports", "output", "output_name", "force", "no_resume"])]
    resume: Option<String>,
    /// Sources as HOST:PORT; repeat or separate with commas.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT")]
    from: Vec<String>,
    /// Host of the sources given with --ports.
    #[arg(long, requires = "ports")]
    host: Option<String>,
    /// Ports on --host.
    #[arg(long, value_delimiter = ',', requires = "host", value_name = "P1,P2,...")]
    ports: Vec<u16>,
    /// Output directory (default: the daemon's download directory); created
    /// if missing.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    output: Option<PathBuf>,
    /// Save the file under this name (in the output directory) instead of
    /// the remote file's name.
    #[arg(short = 'O', long = "output-name", value_name = "NAME")]
    output_name: Option<String>,
    /// Seconds between progress updates.
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    interval: f64,
    /// Do not persist resume state for this download (a crash then starts over).
    #[arg(long)]
    no_resume: bool,
    /// Return as soon as the download is accepted, printing its ID.
    #[arg(long)]
    detach: bool,
    /// Replace an existing file at the destination.
    #[arg(long)]
    force: bool,
    /// TCP connections per source, 1 to 16, or 0 to adapt to the path
    /// (default: the daemon's setting, which is 0 unless configured).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=16))]
    connections_per_server: Option<u32>,
    /// Fail if no source is reachable for this long (e.g. 90s, 10m, 2h);
    /// by default the download waits as long as it takes.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    give_up_after: Option<u64>,
    /// File with the shared secret for servers that require authentication
    /// (read by mftd; default: mftd's own auth_secret_file).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Expected BLAKE3 root identity of the file (64 hex digits, as
    /// `downloads show` prints it): sources serving anything else are
    /// excluded, and the file completes without waiting for a majority.
    #[arg(long, value_name = "ROOT")]
    identity: Option<String>,
    /// The file's expected size (bytes, or with K/M/G/T): sources announcing
    /// another size are not used.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    size: Option<u64>,
}

/// `1048576`, `512K`, `10G` → bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|e| e.replace("rate", "size"))
}

/// `90`, `90s`, `10m`, `2h` → seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('h') => (&t[..t.len() - 1], 3600),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: use e.g. 90s, 10m or 2h"))?;
    if n == 0 {
        return Err("duration must be positive".into());
    }
    n.checked_mul(mult).ok_or_else(|| format!("duration {s:?} is too long"))
}

fn main() -> ExitCode {
    // Behave like other Unix tools when piped into `head`: die quietly on
    // SIGPIPE instead of panicking on a failed write.
    // SAFETY: setting a signal disposition to its default at startup, before
    // any thread exists.
    let _ =
        unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) };
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if json {
                display::print_event(&mftd_common::control::Event::Error(mftd_common::control::Failure::Command {
                    code: e.code(),
                    message: e.to_string(),
                }));
            }
            err(&display::failure(&e.to_string()));
            // As documented: 1 for failures, 2 for bad usage.
            if matches!(e, CtlError::Usage(_)) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, CtlError> {
    let socket = cli.socket.clone().unwrap_or_else(mftd_common::paths::client_socket_path);
    let json = cli.json;
    match cli.cmd {
        Cmd::Get(args) => get(&socket, json, *args),
        Cmd::Status => simple(&socket, json, Request::Status),
        Cmd::Shutdown => simple(&socket, json, Request::Shutdown),
        Cmd::Servers(s) => simple(
            &socket,
            json,
            match s {
                ServersCmd::List => Request::ServersList,
                ServersCmd::Stop { port } => Request::ServerStop { port },
                ServersCmd::Start { port } => Request::ServerStart { port },
                ServersCmd::Remove { port } => Request::ServerRemove { port },
                ServersCmd::Add { port, rate_limit, plain } => {
                    Request::ServerAdd { port, rate_limit, transport: plain.then(|| "plain".to_string()) }
                }
                ServersCmd::Limit { port, rate } => Request::ServerLimit { port, rate_limit: rate },
            },
        ),
        Cmd::Completions { .. } if json => {
            Err(CtlError::Usage("completions prints a shell script; --json does not apply to it".into()))
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "mftctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Manpages { dir } => manpages(&dir),
        Cmd::Downloads(d) => {
            let req = match d {
                DownloadsCmd::Watch { id, interval } => {
                    if !(interval > 0.0 && interval <= 3600.0) {
                        return Err(CtlError::Usage("--interval must be more than 0 and at most 3600 seconds".into()));
                    }
                    return follow(&socket, json, id, interval);
                }
                DownloadsCmd::List => Request::DownloadsList,
                DownloadsCmd::Show { id } => Request::DownloadShow { id },
                DownloadsCmd::Pause { id } => Request::DownloadPause { id },
                DownloadsCmd::Resume { id } => Request::DownloadResume { id },
                DownloadsCmd::Cancel { id } => Request::DownloadCancel { id },
                DownloadsCmd::Remove { id } => Request::DownloadRemove { id },
                DownloadsCmd::Purge => Request::DownloadsPurge,
                DownloadsCmd::AddSource { id, sources } => Request::DownloadAddSource { id, sources },
            };
            simple(&socket, json, req)
        }
    }
}

/// Writes `mftctl.1` and one page per subcommand.
fn manpages(dir: &std::path::Path) -> Result<ExitCode, CtlError> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).map_err(|e| CtlError::Usage(format!("cannot create {}: {e}", dir.display())))?;
    let cmd = Cli::command();
    let write = |name: String, cmd: clap::Command| -> Result<(), CtlError> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .map_err(|e| CtlError::Usage(format!("cannot render {name}: {e}")))?;
        let p = dir.join(format!("{name}.1"));
        std::fs::write(&p, buf).map_err(|e| CtlError::Usage(format!("cannot write {}: {e}", p.display())))
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("mftctl-{}", sub.get_name());
        write(name.clone(), sub.clone().name(name))?;
    }
    write("mftctl".into(), cmd)?;
    Ok(ExitCode::SUCCESS)
}

/// One request, one response, printed.
fn simple(socket: &std::path::Path, json: bool, req: Request) -> Result<ExitCode, CtlError> {
    let mut c = Client::connect(socket)?;
    let resp = c.request(&req)?;
    if let Response::Error { .. } = resp {
        return Err(CtlError::from_response(resp));
    }
    if json {
        display::print_json(&resp);
    } else {
        display::print_human(&resp);
    }
    Ok(ExitCode::SUCCESS)
}

fn sources(args: &GetArgs) -> Result<Vec<String>, CtlError> {
    let mut out: Vec<String> = args.from.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if let Some(h) = &args.host {
        let host = if h.contains(':') && !h.starts_with('[') { format!("[{h}]") } else { h.clone() };
        out.extend(args.ports.iter().map(|p| format!("{host}:{p}")));
    }
    if out.is_empty() {
        return Err(CtlError::Usage(
            "no sources: give --from HOST:PORT[,HOST:PORT...] or --host HOST --ports P1,P2,...".into(),
        ));
    }
    Ok(out)
}

fn get(socket: &std::path::Path, json: bool, args: GetArgs) -> Result<ExitCode, CtlError> {
    if let Some(which) = &args.resume {
        if let Some(name) = &args.remote_path {
            return Err(CtlError::Usage(format!(
                "--resume continues downloads by ID, not by name: drop {name:?} (`mftctl downloads list` shows the IDs), or drop --resume to download {name:?}"
            )));
        }
        return get_resume(socket, json, which, &args);
    }
    let sources = sources(&args)?;
    if !(args.interval > 0.0 && args.interval <= 3600.0) {
        return Err(CtlError::Usage("--interval must be more than 0 and at most 3600 seconds".into()));
    }
    let absolute = |p: &PathBuf| -> Result<String, CtlError> {
        let abs = if p.is_absolute() {
            p.clone()
        } else {
            std::env::current_dir()
                .map_err(|e| CtlError::Usage(format!("cannot resolve {}: {e}", p.display())))?
                .join(p)
        };
        // `-o ./x` names cwd/x, not cwd/./x (components() drops the `.`).
        Ok(abs.components().collect::<PathBuf>().display().to_string())
    };
    let output_dir = args.output.as_ref().map(absolute).transpose()?;
    let secret_file = args.secret_file.as_ref().map(absolute).transpose()?;
    let request = |remote: &str| {
        Request::Get(GetRequest {
            remote_path: remote.to_string(),
            sources: sources.clone(),
            output_dir: output_dir.clone(),
            output_name: args.output_name.clone(),
            force: args.force,
            connections_per_source: args.connections_per_server,
            give_up_after_secs: args.give_up_after,
            no_resume: args.no_resume,
            secret_file: secret_file.clone(),
            identity: args.identity.clone(),
            expected_size: args.size,
        })
    };
    let mut c = Client::connect(socket)?;
    let Some(list) = &args.input_file else {
        let remote_path = args.remote_path.clone().unwrap_or_default();
        let resp = c.request(&request(&remote_path))?;
        let Some(id) = accepted(json, &args, &remote_path, resp)? else { return Ok(ExitCode::SUCCESS) };
        if args.detach {
            return Ok(ExitCode::SUCCESS);
        }
        return follow(socket, json, id, args.interval);
    };
    // A list: every file is asked for first (mftd runs them side by side),
    // then followed in turn. One refused does not stop the others.
    let names = read_list(list)?;
    let mut ids = Vec::new();
    let mut failed = 0;
    for name in &names {
        match c.request(&request(name))? {
            resp @ (Response::Accepted { .. } | Response::Identical { .. }) => {
                ids.extend(accepted(json, &args, name, resp)?)
            }
            Response::Error { code, message } => {
                failed += 1;
                // Which line it was, in both forms.
                let message = format!("{name}: {message}");
                if json {
                    display::print_json(&Response::Error { code, message });
                } else {
                    err(&display::failure(&message));
                }
            }
            other => return Err(CtlError::from_response(other)),
        }
    }
    if !args.detach {
        for id in ids {
            if follow(socket, json, id, args.interval)? != ExitCode::SUCCESS {
                failed += 1;
            }
        }
    }
    if failed > 0 {
        if !json {
            err(&format!("mftctl: {failed} of {} downloads did not succeed\n", names.len()));
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reports an accepted `get` and returns its download ID (none if the
/// file was already there, identical).
fn accepted(json: bool, args: &GetArgs, remote_path: &str, resp: Response) -> Result<Option<u64>, CtlError> {
    let (id, destination, resumed, added) = match resp {
        Response::Accepted { id, ref destination, resumed, ref added_sources } => {
            (id, destination.clone(), resumed, added_sources.clone())
        }
        Response::Identical { .. } => {
            if json {
                display::print_json(&resp);
            } else {
                // On stderr with the other status lines; --detach prints no ID.
                if let Response::Identical { destination, identity } = &resp {
                    err(&format!("{}\n", display::identical(destination, identity)));
                }
            }
            return Ok(None);
        }
        other => return Err(CtlError::from_response(other)),
    };
    if json {
        display::print_json(&resp);
    } else if args.detach {
        out(&format!("{id}\n"));
    } else {
        err(&display::started(id, resumed, remote_path, &destination, &added));
        if args.no_resume {
            err("resume state is off for this download: if mftd stops, it starts over\n");
        }
    }
    Ok(Some(id))
}

/// Most remote paths one `get -i` file may list.
const MAX_LIST: usize = 10_000;

/// The remote paths listed in `path` ("-": standard input): one per line,
/// blank lines and `#` comments skipped.
fn read_list(path: &std::path::Path) -> Result<Vec<String>, CtlError> {
    use std::io::Read;
    let mut text = String::new();
    let read = if path == std::path::Path::new("-") {
        std::io::stdin().take(16 << 20).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(16 << 20).read_to_string(&mut text))
    };
    read.map_err(|e| CtlError::Usage(format!("cannot read the list {}: {e}", path.display())))?;
    let names: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    if names.is_empty() {
        return Err(CtlError::Usage(format!("{} lists no remote paths", path.display())));
    }
    if names.len() > MAX_LIST {
        return Err(CtlError::Usage(format!(
            "{} lists {} remote paths; at most {MAX_LIST} at a time",
            path.display(),
            names.len()
        )));
    }
    Ok(names)
}

/// `get --resume [ID]`: continue interrupted downloads and follow them.
fn get_resume(socket: &std::path::Path, json: bool, which: &str, args: &GetArgs) -> Result<ExitCode, CtlError> {
    let id = match which {
        "all" => None,
        n => Some(n.parse::<u64>().map_err(|_| CtlError::Usage(format!("--resume takes a download ID, not {n:?}")))?),
    };
    let mut c = Client::connect(socket)?;
    let resp = c.request(&Request::GetResume { id })?;
    let ids = match &resp {
        Response::Resumed { ids } => ids.clone(),
        _ => return Err(CtlError::from_response(resp)),
    };
    if json {
        display::print_json(&resp);
    } else if args.detach {
        // As `get --detach`: one bare ID per line, for scripts.
        for id in &ids {
            out(&format!("{id}\n"));
        }
    } else if ids.is_empty() {
        display::print_human(&resp);
    }
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let mut code = ExitCode::SUCCESS;
    for id in ids {
        if !json {
            err(&format!("resumed download {id}\n"));
        }
        let c = follow(socket, json, id, args.interval)?;
        if c != ExitCode::SUCCESS {
            code = c;
        }
    }
    Ok(code)
}

/// Streams a download's progress until it ends.
fn follow(socket: &std::path::Path, json: bool, id: u64, interval: f64) -> Result<ExitCode, CtlError> {
    client::install_sigint();
    let interval_ms = (interval * 1000.0) as u64;
    let mut watcher = Client::connect(socket)?;
    watcher.send(&Request::Watch { id, interval_ms })?;
    let mut view = display::ProgressView::new(json);
    loop {
        let resp = match watcher.recv_interruptible()? {
            Some(r) => r,
            None => {
                view.clear();
                let message = format!("detached; download {id} continues in mftd (see `mftctl downloads show {id}`)");
                view.stopped(&Event::Detached { id, message: message.clone() });
                if !json {
                    err(&format!("mftctl: {message}\n"));
                }
                return Ok(ExitCode::from(130));
            }
        };
        match resp {
            Response::Progress { download } => {
                view.update(&download);
                if download.state == mftd_common::control::DownloadState::Paused {
                    view.clear();
                    let message = match download.error.as_deref() {
                        // mftd resumes it by itself; resuming by hand would
                        // only meet the full disk again.
                        Some(e) if e.starts_with(mftd_common::control::DISK_FULL) => {
                            format!("download {id} is paused: {e} (`mftctl downloads show {id}` to check on it)")
                        }
                        Some(e) => format!("download {id} is paused: {e}; `mftctl downloads resume {id}` continues it"),
                        None => format!("download {id} is paused; `mftctl downloads resume {id}` continues it"),
                    };
                    view.stopped(&Event::Paused { id, message: message.clone() });
                    if !json {
                        // The reason is the daemon's, and may quote a path.
                        err(&format!("{}\n", Shown(&message)));
                    }
                    return Ok(ExitCode::FAILURE);
                }
                if download.state.is_final() {
                    view.finish(&download);
                    return Ok(if download.state == mftd_common::control::DownloadState::Done {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    });
                }
            }
            other => return Err(CtlError::from_response(other)),
        }
    }
}

//! `get` of a file that is already at its destination: before fetching
//! anything, its BLAKE3 identity is compared with the one the sources
//! serve (as rsync skips files that are already up to date). Identical:
//! nothing is downloaded. Different, or not comparable: the usual refusal,
//! saying which (and `--force` replaces the file).

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use mftd_common::proto::{Identity, StatInfo};
use tokio::time::timeout;

use super::client::{Conn, Dialer, Event};

/// Longest the sources are given to name their version (hashing included).
pub const PROBE_TIME: Duration = Duration::from_secs(20);

/// How the file at the destination compares with the sources' version.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Same size and BLAKE3 root (hex given).
    Identical(String),
    /// Not the same file; why.
    Different(String),
    /// The sources' version could not be established; why.
    Unknown(String),
}

/// One source's version: size and root.
async fn version_of(
    source: &str,
    path: &str,
    secret: Option<&[u8]>,
    dialer: &Dialer,
    idle: Duration,
) -> Result<(u64, [u8; 32]), String> {
    let (conn, stat): (Conn, StatInfo) =
        Conn::open(source, idle, secret, path, dialer).await.map_err(|e| format!("{source}: {e}"))?;
    if let Some(root) = stat.root {
        return Ok((stat.size, root));
    }
    // Still hashing: its piece hashes arrive when it is done.
    let mut s = conn.into_stream();
    s.hashes(path, stat.size, stat.mtime_ns).await.map_err(|e| format!("{source}: {e}"))?;
    loop {
        match s.next().await {
            Some(Event::Hashes(h)) => {
                return Ok((stat.size, Identity::from_hashes(stat.size, stat.piece_size, h).root))
            }
            Some(Event::Error { message, .. }) => return Err(format!("{source}: {message}")),
            Some(Event::Failed(e)) => return Err(format!("{source}: {e}")),
            Some(_) => {}
            None => return Err(format!("{source}: connection closed")),
        }
    }
}

/// Whom to ask about which file, and how.
pub struct Ask<'a> {
    pub sources: &'a [String],
    pub path: &'a str,
    pub secret: Option<Arc<Vec<u8>>>,
    pub dialer: Arc<Dialer>,
    pub idle: Duration,
    /// The version the user pinned, if any.
    pub pin: Option<[u8; 32]>,
}

/// The version the sources serve: the pinned one if given, else the one a
/// strict majority of all the sources named (the rule downloads vote by).
async fn sources_version(ask: &Ask<'_>) -> Result<(u64, [u8; 32]), String> {
    let (sources, idle, pin) = (ask.sources, ask.idle, ask.pin);
    let mut asks = tokio::task::JoinSet::new();
    for s in sources {
        let (s, path, secret, dialer) = (s.clone(), ask.path.to_string(), ask.secret.clone(), ask.dialer.clone());
        asks.spawn(async move {
            timeout(PROBE_TIME, version_of(&s, &path, secret.as_deref().map(|v| v.as_slice()), &dialer, idle))
                .await
                .unwrap_or_else(|_| Err(format!("{s}: no version named within {} s", PROBE_TIME.as_secs())))
        });
    }
    let mut answers = Vec::new();
    while let Some(a) = asks.join_next().await {
        answers.push(a.unwrap_or_else(|e| Err(format!("probe task: {e}"))));
    }
    let mut votes: Vec<((u64, [u8; 32]), usize)> = Vec::new();
    let mut errors = Vec::new();
    for a in answers {
        match a {
            Ok(v) => match votes.iter_mut().find(|(w, _)| *w == v) {
                Some((_, n)) => *n += 1,
                None => votes.push((v, 1)),
            },
            Err(e) => errors.push(e),
        }
    }
    if let Some(pin) = pin {
        return match votes.iter().find(|((_, r), _)| *r == pin) {
            Some((v, _)) => Ok(*v),
            None => Err(format!("no source serves the pinned version{}", reasons(&errors))),
        };
    }
    votes.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    match votes.first() {
        Some((v, n)) if n * 2 > sources.len() => Ok(*v),
        _ => Err(format!(
            "no majority of the {} sources named one version ({} versions named){}",
            sources.len(),
            votes.len(),
            reasons(&errors)
        )),
    }
}

fn reasons(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!("; {}", errors.join("; "))
    }
}

/// Compares `local` (open, `local_size` bytes) with what the sources serve.
/// Blocking: call off the async runtime, from a thread that can reach it.
pub fn compare(local: &File, local_size: u64, ask: &Ask<'_>) -> Verdict {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return Verdict::Unknown("no runtime to ask the sources from".into());
    };
    let (size, root) = match rt.block_on(sources_version(ask)) {
        Ok(v) => v,
        Err(e) => return Verdict::Unknown(e),
    };
    if size != local_size {
        return Verdict::Different(format!("{local_size} bytes here, {size} bytes at the sources"));
    }
    match crate::identity::hash_file(local, local_size, 2) {
        Ok(id) if id.root == root => Verdict::Identical(hex::encode(root)),
        Ok(id) => Verdict::Different(format!(
            "same size, but BLAKE3 {} here and {} at the sources",
            &hex::encode(id.root)[..16],
            &hex::encode(root)[..16]
        )),
        Err(e) => Verdict::Unknown(format!("cannot read the file here: {e}")),
    }
}

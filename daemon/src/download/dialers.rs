//! Which node identity a download presents and which `known_nodes` record
//! it trusts and writes: the daemon's for root and mftd's own user, one of
//! the owner's own for everyone else.
//!
//! Another server's `allow_nodes` names the nodes it serves. If mftd
//! presented its own certificate for a member of its socket group, that
//! member would be served as mftd: anything a server allows this daemon
//! would be the member's to fetch. So a restricted owner's downloads present
//! a node identity of that user's own, `STATE_DIR/users/UID/node.key` (mode
//! 0600) and `node.crt`, made by the daemon the first time the user needs
//! it (a download, or `mftctl status`, which shows the user this node ID).
//! The key stays the daemon's: the user never needs it, and a server that
//! wants to serve the user lists the user's node ID.
//!
//! Trust on first use works the same way: a restricted owner's downloads
//! record new nodes in `STATE_DIR/users/UID/known_nodes`, never in the
//! daemon's `known_nodes`. They read the daemon's record first: what the
//! operator recorded vouches for (or refuses) a node for every user, so a
//! user cannot pin or deny an address for root, and the operator's pins
//! protect users too.
//!
//! Must never: hand a restricted owner the daemon's dialer, or write the
//! daemon's `known_nodes` for a restricted owner. The owner is the one the
//! manifest records, so a download resumed after a restart keeps it.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::client::Dialer;
use crate::caller::Caller;
use crate::node::{KnownNodes, NodeIdentity, TlsConfigs};

/// The daemon's dialer and the per-user ones, made on first use.
pub struct Dialers {
    daemon: Arc<Dialer>,
    /// `STATE_DIR/users`: one directory per restricted user, by uid.
    users: PathBuf,
    by_uid: Mutex<HashMap<u32, Arc<Dialer>>>,
}

impl std::fmt::Debug for Dialers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialers").field("daemon", &self.daemon).field("users", &self.users).finish_non_exhaustive()
    }
}

impl Dialers {
    /// The daemon's own dialer (its identity and `known_nodes`), and where
    /// users' identities are kept under `state_dir`.
    pub fn new(state_dir: &Path, daemon: Dialer) -> Dialers {
        Dialers { daemon: Arc::new(daemon), users: state_dir.join("users"), by_uid: Mutex::new(HashMap::new()) }
    }

    /// The dialer `owner`'s downloads connect with: the daemon's for an
    /// unrestricted owner, else the owner's own (made now if it is new).
    pub fn for_owner(&self, owner: &Caller) -> Result<Arc<Dialer>, String> {
        if owner.unrestricted() {
            return Ok(self.daemon.clone());
        }
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = by_uid.get(&owner.uid) {
            return Ok(d.clone());
        }
        let dir = self.users.join(owner.uid.to_string());
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| NodeIdentity::load_or_create(&dir))
            .and_then(|node| TlsConfigs::new(&node))
            .and_then(|tls| {
                let known = KnownNodes::load(&dir.join("known_nodes"), self.daemon.known.mode())?
                    .beside(self.daemon.known.clone());
                Ok(Dialer { tls: Arc::new(tls), known: Arc::new(known) })
            })
            .map_err(|e| {
                format!("cannot load the node identity of {} from {}: {e:#}", owner.describe(), dir.display())
            })?;
        tracing::info!(uid = owner.uid, node_id = %made.tls.id, "node identity of a restricted user");
        let made = Arc::new(made);
        by_uid.insert(owner.uid, made.clone());
        Ok(made)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::TrustMode;

    fn dialers(state: &Path) -> Dialers {
        let node = NodeIdentity::load_or_create(state).unwrap();
        let known = KnownNodes::load(&state.join("known_nodes"), TrustMode::Tofu).unwrap();
        Dialers::new(state, Dialer { tls: Arc::new(TlsConfigs::new(&node).unwrap()), known: Arc::new(known) })
    }

    #[test]
    fn a_restricted_owner_gets_an_identity_of_its_own_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dialers(dir.path());
        let daemon = d.for_owner(&Caller::daemon()).unwrap();
        let user = Caller { uid: 65534, gid: 65534, groups: vec![], pid: 0 };
        let mine = d.for_owner(&user).unwrap();
        assert_ne!(mine.tls.id, daemon.tls.id, "a restricted owner presents the daemon's node identity");
        assert!(Arc::ptr_eq(&mine, &d.for_owner(&user).unwrap()), "made twice");
        use std::os::unix::fs::MetadataExt;
        let key = std::fs::metadata(dir.path().join("users/65534/node.key")).unwrap();
        assert_eq!((key.mode() & 0o777, key.uid()), (0o600, nix::unistd::geteuid().as_raw()));
        // The same user after a restart (a manifest's owner): the same node.
        let again = dialers(dir.path()).for_owner(&Caller::user(65534, 65534)).unwrap();
        assert_eq!(again.tls.id, mine.tls.id);
        let other = d.for_owner(&Caller { uid: 65533, ..user }).unwrap();
        assert_ne!(other.tls.id, mine.tls.id);
    }
}

//! Node identities: who a transfer connection is really talking to.
//!
//! Each daemon has a long-term key and a self-signed certificate, made at
//! its first start (`STATE_DIR/node.key`, mode 0600, and `node.crt`). Its
//! **node ID** is the first 128 bits of the SHA-256 of that certificate,
//! written in lowercase base32 (26 characters). No certificate authority is
//! involved: a TLS 1.3 handshake proves that the peer holds the key of the
//! certificate it shows (its `CertificateVerify` signature is checked), and
//! the node ID of that certificate is then checked against what the user
//! pinned (`HOST:PORT#NODEID`), the `known_nodes` file, or, on a listener,
//! `allow_nodes`.
//!
//! The daemon's identity and `known_nodes` are root's and mftd's own
//! user's. Downloads of other users (members of the socket group) present
//! an identity of that user's own and keep a `known_nodes` of their own
//! ([`crate::download::dialers`]), so another server's `allow_nodes` and
//! this daemon's record mean what they say.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::Digest;

/// A node's identity: 26 lowercase base32 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

const NODE_ID_LEN: usize = 26;

impl NodeId {
    /// The node ID of a certificate.
    pub fn of(cert: &[u8]) -> NodeId {
        let digest = sha2::Sha256::digest(cert);
        NodeId(data_encoding::BASE32_NOPAD.encode(&digest[..16]).to_ascii_lowercase())
    }

    pub fn parse(s: &str) -> Result<NodeId, String> {
        let lower = s.trim().to_ascii_lowercase();
        let ok = lower.len() == NODE_ID_LEN
            && data_encoding::BASE32_NOPAD.decode(lower.to_ascii_uppercase().as_bytes()).is_ok_and(|b| b.len() == 16);
        if ok {
            Ok(NodeId(lower))
        } else {
            Err(format!("{s:?} is not a node ID ({NODE_ID_LEN} base32 characters, as `mftd --print-node-id` shows)"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A source as a `get` names it: `[plain://]HOST:PORT[#NODEID]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceAddr {
    /// `HOST:PORT`, as given to `connect`.
    pub addr: String,
    /// Plain TCP, no TLS (an explicit opt-in for trusted networks).
    pub plain: bool,
    /// The node ID the source must prove.
    pub node: Option<NodeId>,
}

impl SourceAddr {
    pub fn parse(s: &str) -> Result<SourceAddr, String> {
        let t = s.trim();
        let (plain, rest) = match t.strip_prefix("plain://") {
            Some(r) => (true, r),
            None => (false, t.strip_prefix("tls://").unwrap_or(t)),
        };
        let (addr, node) = match rest.split_once('#') {
            Some((a, n)) => (a, Some(NodeId::parse(n)?)),
            None => (rest, None),
        };
        if plain && node.is_some() {
            return Err(format!("source {s:?}: a plain source cannot prove a node ID; drop plain:// or the #NODEID"));
        }
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("source {s:?} needs a port: HOST:PORT"))?;
        if host.is_empty() {
            return Err(format!("source {s:?} has no host"));
        }
        // A name, an IPv4 address or a bracketed IPv6 one: nothing that
        // could break a line of known_nodes or a log line.
        let v6 = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let ok = match v6 {
            Some(a) => a.parse::<std::net::Ipv6Addr>().is_ok(),
            None => {
                host.len() <= 253
                    && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            }
        };
        if !ok {
            return Err(format!("source {s:?}: {host:?} is not a host name or address"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(SourceAddr { addr: format!("{}:{p}", host.to_ascii_lowercase()), plain, node }),
            _ => Err(format!("source {s:?} has an invalid port {port:?}")),
        }
    }
}

/// This daemon's key and certificate.
pub struct NodeIdentity {
    pub id: NodeId,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl NodeIdentity {
    /// Loads the identity from `state_dir`, making one at the first start
    /// (the key first, then its certificate: a start interrupted between
    /// the two makes the certificate next time).
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<NodeIdentity> {
        let (key_path, cert_path) = (state_dir.join("node.key"), state_dir.join("node.crt"));
        let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        if !exists(&key_path) {
            if exists(&cert_path) {
                bail!(
                    "{} is missing but {} is there; restore the key or remove both",
                    key_path.display(),
                    cert_path.display()
                );
            }
            std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
            let key = rcgen::KeyPair::generate().context("cannot generate a node key")?;
            write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        }
        let key_pem = read_private(&key_path)?;
        if !exists(&cert_path) {
            let key = rcgen::KeyPair::from_pem(&key_pem).context("cannot read the node key")?;
            let cert = rcgen::CertificateParams::new(vec!["mftd".to_string()])
                .and_then(|p| p.self_signed(&key))
                .context("cannot make the node certificate")?;
            write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
            tracing::info!(node_id = %NodeId::of(cert.der()), "made a new node identity");
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot read the node key {}: {e}", key_path.display()))?;
        let cert = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| anyhow::anyhow!("cannot read the node certificate {}: {e}", cert_path.display()))?;
        Ok(NodeIdentity { id: NodeId::of(&cert), cert, key })
    }
}

/// Reads the node key: a regular file of ours, not a symlink, mode 0600.
fn read_private(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open the node key {} (a symlink is refused)", path.display()))?;
    let meta = f.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_file() || meta.uid() != me {
        bail!("{} must be a regular file owned by uid {me}", path.display());
    }
    if meta.mode() & 0o077 != 0 {
        bail!("{} is readable by others (mode {:o}); chmod 600 it", path.display(), meta.mode() & 0o777);
    }
    let mut s = String::new();
    Read::by_ref(&mut f)
        .take(64 << 10)
        .read_to_string(&mut s)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(s)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("cannot write {}", path.display()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate whose key signs the handshake: the node ID is
/// checked once the handshake is over, where the answer can say which IDs
/// were expected and seen. Only TLS 1.3 is offered.
#[derive(Debug)]
struct AnyNode {
    algs: WebPkiSupportedAlgorithms,
}

/// The signature checks the server and client verifiers share.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

impl ServerCertVerifier for AnyNode {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

impl ClientCertVerifier for AnyNode {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    /// A client without a certificate is let through the handshake (it
    /// then has no node ID, which `allow_nodes` refuses with a message).
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

/// ALPN name of this protocol version: a peer of another version fails
/// the TLS handshake with `no_application_protocol`.
pub const ALPN: &[u8] = b"mftd/4";

/// TLS configurations built from the node identity.
pub struct TlsConfigs {
    pub id: NodeId,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfigs").field("id", &self.id).finish_non_exhaustive()
    }
}

impl TlsConfigs {
    pub fn new(identity: &NodeIdentity) -> anyhow::Result<TlsConfigs> {
        let p = provider();
        let algs = p.signature_verification_algorithms;
        let mut server = rustls::ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(AnyNode { algs }))
            .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
            .context("the node key does not fit its certificate")?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        // Every connection is a fresh full handshake: no tickets to keep.
        server.send_tls13_tickets = 0;
        let mut client = rustls::ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyNode { algs }))
            .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())
            .context("the node key does not fit its certificate")?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.enable_sni = false;
        // Every server is named "mftd": a ticket from one would be offered
        // to the next. Full handshakes only.
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConfigs { id: identity.id.clone(), server: Arc::new(server), client: Arc::new(client) })
    }
}

/// What a download does with a source whose node ID nothing pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustMode {
    /// Accept it (the channel is encrypted, the server unauthenticated
    /// unless a shared secret proves it); known nodes are still enforced.
    Any,
    /// Accept it and record it in `known_nodes`; a changed ID is refused.
    Tofu,
    /// Refuse it: only pinned and known nodes (and no plain sources).
    Known,
}

impl KnownNodes {
    /// Whether plain (unauthenticated) sources may be used at all.
    pub fn allows_plain(&self) -> bool {
        self.mode != TrustMode::Known
    }
}

impl std::str::FromStr for TrustMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(TrustMode::Any),
            "tofu" => Ok(TrustMode::Tofu),
            "known" => Ok(TrustMode::Known),
            _ => Err(format!("{s:?}: node_trust is one of any, tofu, known")),
        }
    }
}

impl std::fmt::Display for TrustMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrustMode::Any => "any",
            TrustMode::Tofu => "tofu",
            TrustMode::Known => "known",
        })
    }
}

/// Nodes a restricted user's record keeps at most: a member naming a new
/// address for every download cannot grow a file in mftd's state
/// directory without bound.
pub const USER_RECORD_MAX: usize = 4096;

/// The `known_nodes` file: lines of `HOST:PORT NODEID` (`#` comments),
/// like ssh's `known_hosts`.
pub struct KnownNodes {
    path: PathBuf,
    mode: TrustMode,
    entries: Mutex<HashMap<String, NodeId>>,
    /// The operator's record, read before this one and never written from
    /// here (see [`KnownNodes::beside`]).
    operator: Option<Arc<KnownNodes>>,
}

impl KnownNodes {
    pub fn load(path: &Path, mode: TrustMode) -> anyhow::Result<KnownNodes> {
        let mut entries = HashMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let mut words = line.split_whitespace();
                    let (Some(addr), Some(id), None) = (words.next(), words.next(), words.next()) else {
                        bail!("{}:{}: expected `HOST:PORT NODEID`", path.display(), n + 1);
                    };
                    let id = NodeId::parse(id).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
                    let addr =
                        SourceAddr::parse(addr).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?.addr;
                    if let Some(before) = entries.insert(addr.clone(), id.clone()) {
                        if before != id {
                            bail!("{}:{}: {addr} is listed twice with different node IDs", path.display(), n + 1);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
        Ok(KnownNodes { path: path.to_path_buf(), mode, entries: Mutex::new(entries), operator: None })
    }

    /// This record read after `operator`'s: an address the operator recorded
    /// is vouched for or refused by that entry alone, and only addresses it
    /// does not list are looked up (and, under TOFU, recorded) here. A
    /// restricted user's record is kept this way, so what the operator
    /// pinned protects the user too, while nothing the user's downloads
    /// record reaches the operator's file.
    pub fn beside(self, operator: Arc<KnownNodes>) -> KnownNodes {
        KnownNodes { operator: Some(operator), ..self }
    }

    /// What to do with a node nothing records.
    pub fn mode(&self) -> TrustMode {
        self.mode
    }

    /// The node ID recorded for `addr` (`HOST:PORT`), if any.
    fn recorded(&self, addr: &str) -> Option<NodeId> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(addr).cloned()
    }

    /// Whether `source` may be the node `seen` (the error names both IDs);
    /// `Ok(true)` when a pin or a `known_nodes` entry vouches for it.
    pub fn check(&self, source: &SourceAddr, seen: &NodeId) -> Result<bool, String> {
        if let Some(pinned) = &source.node {
            if pinned != seen {
                return Err(format!(
                    "{} presented node ID {seen}, but {pinned} was pinned: refusing it (a different server, or someone in between)",
                    source.addr
                ));
            }
            return Ok(true);
        }
        if let Some(operator) = &self.operator {
            match operator.recorded(&source.addr) {
                Some(known) if known == *seen => return Ok(true),
                Some(known) => {
                    return Err(format!(
                        "{} presented node ID {seen}, but {} records {known} for it: refusing it; if the server's identity really changed, ask the operator to remove that line",
                        source.addr,
                        operator.path.display()
                    ))
                }
                None => {}
            }
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(&source.addr) {
            Some(known) if known == seen => Ok(true),
            Some(known) => Err(format!(
                "{} presented node ID {seen}, but {} records {known} for it: refusing it; if the server's identity really changed, {}",
                source.addr,
                self.path.display(),
                // A user's record is the daemon's file, kept for the user.
                if self.operator.is_some() { "ask the operator to remove that line" } else { "remove that line" }
            )),
            None => match self.mode {
                TrustMode::Any => Ok(false),
                TrustMode::Known => Err(format!(
                    "{} presented node ID {seen}, which is not in {} (node_trust = known); pin it as {}#{seen} or add it there",
                    source.addr,
                    self.path.display(),
                    source.addr
                )),
                TrustMode::Tofu if self.operator.is_some() && entries.len() >= USER_RECORD_MAX => Err(format!(
                    "{} holds {} nodes, the most mftd records for one user (trust on first use): refusing the new node {} at {}; ask the operator to prune it or pin the node as {}#{seen}",
                    self.path.display(),
                    entries.len(),
                    seen,
                    source.addr,
                    source.addr
                )),
                TrustMode::Tofu => {
                    let line = format!("{} {seen}\n", source.addr);
                    let written = std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .mode(0o600)
                        .open(&self.path)
                        .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|_| f.sync_all()));
                    if let Err(e) = written {
                        return Err(format!("cannot record {} in {}: {e}", source.addr, self.path.display()));
                    }
                    tracing::info!(source = %source.addr, node_id = %seen, "recorded a new node (trust on first use)");
                    entries.insert(source.addr.clone(), seen.clone());
                    Ok(false)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_transport_and_pin() {
        let id = NodeId::of(b"x");
        let s = SourceAddr::parse(&format!("10.0.0.1:5001#{id}")).unwrap();
        assert_eq!((s.addr.as_str(), s.plain, s.node.as_ref()), ("10.0.0.1:5001", false, Some(&id)));
        let s = SourceAddr::parse("plain://[::1]:5002").unwrap();
        assert_eq!((s.addr.as_str(), s.plain, s.node), ("[::1]:5002", true, None));
        assert!(SourceAddr::parse("h:5001#nope").unwrap_err().contains("not a node ID"));
        assert!(SourceAddr::parse(&format!("plain://h:1#{id}")).is_err());
        assert!(SourceAddr::parse("h").is_err());
        assert!(SourceAddr::parse("h:0").is_err());
        // Nothing that could forge a line of known_nodes or a log line.
        for bad in ["x\nvictim:5001", "a b:1", "h\t:1", "[nope]:1", "ho#st:1"] {
            assert!(SourceAddr::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(SourceAddr::parse("Mirror.Example:7").unwrap().addr, "mirror.example:7");
    }

    #[test]
    fn known_nodes_may_not_list_an_address_twice_differently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_nodes");
        let (a, b) = (NodeId::of(b"a"), NodeId::of(b"b"));
        std::fs::write(&path, format!("# comment\nh:1 {a}\nh:1 {a}\n")).unwrap();
        let k = KnownNodes::load(&path, TrustMode::Any).unwrap();
        assert_eq!(k.check(&SourceAddr::parse("H:1").unwrap(), &a), Ok(true));
        std::fs::write(&path, format!("h:1 {a}\nh:1 {b}\n")).unwrap();
        assert!(KnownNodes::load(&path, TrustMode::Any).is_err());
        std::fs::write(&path, "h:1 nonsense\n").unwrap();
        assert!(KnownNodes::load(&path, TrustMode::Any).is_err());
    }

    #[test]
    fn a_key_without_a_certificate_gets_one_and_a_loose_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeIdentity::load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("node.crt")).unwrap();
        let b = NodeIdentity::load_or_create(dir.path()).unwrap();
        assert_ne!(a.id, b.id, "a new certificate is a new node ID");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("node.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeIdentity::load_or_create(dir.path()).err().expect("a 0644 key was accepted").to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeIdentity::load_or_create(dir.path()).unwrap();
        let b = NodeIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.id.as_str().len(), NODE_ID_LEN);
        let mode = std::fs::metadata(dir.path().join("node.key")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(TlsConfigs::new(&a).is_ok());
    }

    #[test]
    fn a_users_record_reads_the_operators_first_and_writes_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("known_nodes"), dir.path().join("user_known_nodes"));
        let (a, b) = (NodeId::of(b"a"), NodeId::of(b"b"));
        std::fs::write(&ours, format!("pinned:1 {a}\n")).unwrap();
        let operator = Arc::new(KnownNodes::load(&ours, TrustMode::Tofu).unwrap());
        let user = KnownNodes::load(&theirs, TrustMode::Tofu).unwrap().beside(operator.clone());
        let pinned = SourceAddr::parse("pinned:1").unwrap();
        assert_eq!(user.check(&pinned, &a), Ok(true), "the operator's pin vouches for the user too");
        let e = user.check(&pinned, &b).unwrap_err();
        assert!(e.contains(ours.to_str().unwrap()) && e.contains(a.as_str()), "{e}");
        // A new node is recorded in the user's file only.
        let new = SourceAddr::parse("new:1").unwrap();
        assert_eq!(user.check(&new, &b), Ok(false));
        assert_eq!(std::fs::read_to_string(&ours).unwrap(), format!("pinned:1 {a}\n"));
        assert!(std::fs::read_to_string(&theirs).unwrap().contains(&format!("new:1 {b}")));
        // The operator's own downloads are not bound by what the user saw.
        assert_eq!(operator.check(&new, &a), Ok(false));
        // Once the operator records the address, its entry decides for the user.
        assert!(user.check(&new, &a).is_ok(), "the operator's record was not read first");
    }

    #[test]
    fn a_users_record_stops_growing_at_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("known_nodes"), dir.path().join("user_known_nodes"));
        let lines: String = (0..USER_RECORD_MAX).map(|i| format!("h{i}:1 {}\n", NodeId::of(b"x"))).collect();
        std::fs::write(&theirs, &lines).unwrap();
        let operator = Arc::new(KnownNodes::load(&ours, TrustMode::Tofu).unwrap());
        let user = KnownNodes::load(&theirs, TrustMode::Tofu).unwrap().beside(operator.clone());
        let e = user.check(&SourceAddr::parse("new:1").unwrap(), &NodeId::of(b"y")).unwrap_err();
        assert!(e.contains("the most mftd records for one user") && e.contains("#"), "{e}");
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), lines, "nothing more was written");
        // Recorded ones still vouch, and the operator's own record is not capped.
        assert_eq!(user.check(&SourceAddr::parse("h7:1").unwrap(), &NodeId::of(b"x")), Ok(true));
        std::fs::write(&ours, &lines).unwrap();
        let operator = KnownNodes::load(&ours, TrustMode::Tofu).unwrap();
        assert_eq!(operator.check(&SourceAddr::parse("new:1").unwrap(), &NodeId::of(b"y")), Ok(false));
    }

    #[test]
    fn trust_on_first_use_records_then_refuses_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_nodes");
        let k = KnownNodes::load(&path, TrustMode::Tofu).unwrap();
        let src = SourceAddr::parse("h:5001").unwrap();
        let (a, b) = (NodeId::of(b"a"), NodeId::of(b"b"));
        assert_eq!(k.check(&src, &a), Ok(false), "first use vouches for nothing");
        assert_eq!(k.check(&src, &a), Ok(true));
        let e = k.check(&src, &b).unwrap_err();
        assert!(e.contains(a.as_str()) && e.contains(b.as_str()), "{e}");
        // Recorded on disk: a new load refuses it too, even in `any` mode.
        let k2 = KnownNodes::load(&path, TrustMode::Any).unwrap();
        assert!(k2.check(&src, &b).is_err());
        let other = SourceAddr::parse("h:5002").unwrap();
        assert!(k2.check(&other, &b).is_ok());
        let k3 = KnownNodes::load(&path, TrustMode::Known).unwrap();
        assert!(k3.check(&other, &b).unwrap_err().contains("not in"));
    }
}

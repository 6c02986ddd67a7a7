//! The connection handshake (spec §2.2–2.5, with the §2.10 fixes), as a sans-IO state machine.
//!
//! Wire (see `router/docs/mesh-protocol.md`):
//! 1. Each side sends the 7-byte header `weave` + min version + max version (Weave's layout, so a
//!    Go Weave 2.8 peer, which speaks 1..2, fails with its "incompatible version range" error and we
//!    fail with [`HandshakeError::VersionMismatch`]). The chosen version is the top of the overlap.
//! 2. Each side sends a `Hello` frame (`[u32 len][body]`): encryption flag, peer name, UID,
//!    connection id, 32-byte nonce, ephemeral X25519 public key, KDF parameters, nickname.
//! 3. Without a password, done. With one: both derive the keys from the X25519 output, the
//!    Argon2id-stretched password (salt from both nonces) and the transcript hash; the dialler sends
//!    a `Confirm` MAC, the listener checks it, then sends its own, which the dialler checks. A check
//!    that fails yields [`HandshakeError::PasswordMismatch`], and the side that noticed sends an
//!    `Abort` frame so the other one reports the same.
//!
//! The listener never emits anything derived from the password before the dialler has proven it
//! knows it, so probing a listener gives no offline-guessing oracle.

use std::fmt;
use std::time::{Duration, Instant};

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use x25519_dalek::{EphemeralSecret, PublicKey};

use super::peer::{Peer, PeerName, PeerUid, MAX_NICKNAME_LEN};
use super::wire::{put_short_str, FrameCodec, FrameError, Reader};

/// The protocol identifier at the start of every connection.
pub const PROTOCOL_MAGIC: &[u8; 5] = b"weave";
/// Lowest protocol version we speak. Go Weave speaks 1..2; our wire format is not compatible.
pub const PROTOCOL_MIN_VERSION: u8 = 3;
/// Highest protocol version we speak.
pub const PROTOCOL_MAX_VERSION: u8 = 3;
/// Length of the protocol header.
pub const HEADER_LEN: usize = 7;
/// Cap on handshake frames (a Hello is < 400 bytes).
pub const MAX_HANDSHAKE_FRAME: usize = 1024;
/// Deadline for the header exchange (spec §2.1).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the rest of the handshake.
pub const INTRO_TIMEOUT: Duration = Duration::from_secs(60);

const LABEL: &[u8] = b"weave-mesh v3";
const MSG_HELLO: u8 = 1;
const MSG_CONFIRM: u8 = 2;
const MSG_ABORT: u8 = 3;
const FLAG_ENCRYPT: u8 = 1;
const FLAG_TRUSTS_YOU: u8 = 2;

/// Argon2id cost parameters for stretching the password (one run per handshake, per side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl KdfParams {
    /// Production default: 51 ms per run measured on a 2-core VM (release build), 32 MiB.
    pub const DEFAULT: KdfParams = KdfParams {
        m_cost_kib: 32 * 1024,
        t_cost: 2,
        p_cost: 1,
    };
    /// Cheapest valid setting: tests only.
    pub const INSECURE_FAST: KdfParams = KdfParams {
        m_cost_kib: 8,
        t_cost: 1,
        p_cost: 1,
    };
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What we present to every remote.
#[derive(Clone)]
pub struct HandshakeConfig {
    pub name: PeerName,
    pub nickname: String,
    pub uid: PeerUid,
    pub min_version: u8,
    pub max_version: u8,
    /// Mesh password; `None` (or empty) = no encryption, as in Weave.
    pub password: Option<Vec<u8>>,
    pub kdf: KdfParams,
}

impl fmt::Debug for HandshakeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeConfig")
            .field("name", &self.name)
            .field("nickname", &self.nickname)
            .field("uid", &self.uid)
            .field("versions", &(self.min_version..=self.max_version))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("kdf", &self.kdf)
            .finish()
    }
}

impl HandshakeConfig {
    pub fn new(name: PeerName, nickname: impl Into<String>, uid: PeerUid) -> Self {
        HandshakeConfig {
            name,
            nickname: nickname.into(),
            uid,
            min_version: PROTOCOL_MIN_VERSION,
            max_version: PROTOCOL_MAX_VERSION,
            password: None,
            kdf: KdfParams::DEFAULT,
        }
    }

    fn encrypted(&self) -> bool {
        self.password.as_ref().is_some_and(|p| !p.is_empty())
    }
}

/// Why a handshake failed. The `Display` text is what the shell logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("remote protocol header not recognised")]
    BadMagic,
    #[error(
        "remote version range [{},{}] is incompatible with ours [{},{}]",
        theirs.0, theirs.1, ours.0, ours.1
    )]
    VersionMismatch { ours: (u8, u8), theirs: (u8, u8) },
    #[error("{}", if *we_encrypt {
        "password specified, but peer requested an unencrypted connection"
    } else {
        "no password specified, but peer requested an encrypted connection"
    })]
    EncryptionMismatch { we_encrypt: bool },
    #[error("password mismatch: the peer does not share our password")]
    PasswordMismatch,
    #[error("peer uses different password-stretching (KDF) parameters")]
    KdfMismatch,
    #[error("cannot connect to ourself")]
    ConnectToSelf,
    #[error("peer names collision: remote {name} uses our name with another UID")]
    NameCollision { name: PeerName },
    #[error("remote public key is invalid (low order point)")]
    WeakKey,
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("remote aborted the handshake (reason {0})")]
    RemoteAborted(u8),
    #[error("handshake timed out")]
    Timeout,
    #[error("password stretching failed: {0}")]
    Kdf(String),
    #[error("handshake already failed")]
    Failed,
}

impl HandshakeError {
    /// Errors after which the target must never be retried (spec §2.5).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            HandshakeError::ConnectToSelf | HandshakeError::NameCollision { .. }
        )
    }

    fn abort_code(&self) -> Option<u8> {
        match self {
            HandshakeError::PasswordMismatch => Some(1),
            HandshakeError::KdfMismatch => Some(2),
            _ => None,
        }
    }

    fn from_abort_code(code: u8) -> Self {
        match code {
            1 => HandshakeError::PasswordMismatch,
            2 => HandshakeError::KdfMismatch,
            c => HandshakeError::RemoteAborted(c),
        }
    }
}

/// Per-connection key material (password mode). Directions are from our point of view: our
/// `tcp_send` is the remote's `tcp_recv`, and likewise for UDP.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    pub tcp_send: [u8; 32],
    pub tcp_recv: [u8; 32],
    pub udp_send: [u8; 32],
    pub udp_recv: [u8; 32],
    /// Secret from which the next epoch's keys are derived (mixed with a fresh DH on rekey).
    pub chain: [u8; 32],
    /// 0 after the handshake, +1 per rekey.
    pub epoch: u32,
    /// SHA-256 of the handshake transcript (not secret; binds the keys to this session).
    pub transcript_hash: [u8; 32],
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("epoch", &self.epoch)
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// Derive one epoch's keys. `initiator` = we dialled. Labels name the direction in terms of the
/// dialler ("i") and listener ("r"), so both ends compute the same four keys.
pub(crate) fn derive_keys(
    salt: &[u8],
    ikm: &[u8],
    transcript_hash: [u8; 32],
    epoch: u32,
    initiator: bool,
) -> (SessionKeys, [u8; 32], [u8; 32]) {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let expand = |what: &[u8]| -> [u8; 32] {
        let mut info = Vec::with_capacity(LABEL.len() + 48);
        info.extend_from_slice(LABEL);
        info.extend_from_slice(&transcript_hash);
        info.extend_from_slice(&epoch.to_be_bytes());
        info.extend_from_slice(what);
        let mut okm = [0u8; 32];
        hk.expand(&info, &mut okm)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        okm
    };
    let (tcp_i, tcp_r) = (expand(b" tcp i->r"), expand(b" tcp r->i"));
    let (udp_i, udp_r) = (expand(b" udp i->r"), expand(b" udp r->i"));
    let (conf_i, conf_r) = (expand(b" confirm i"), expand(b" confirm r"));
    let chain = expand(b" chain");
    let (tcp_send, tcp_recv, udp_send, udp_recv) = if initiator {
        (tcp_i, tcp_r, udp_i, udp_r)
    } else {
        (tcp_r, tcp_i, udp_r, udp_i)
    };
    (
        SessionKeys {
            tcp_send,
            tcp_recv,
            udp_send,
            udp_recv,
            chain,
            epoch,
            transcript_hash,
        },
        conf_i,
        conf_r,
    )
}

/// The result of a completed handshake.
#[derive(Debug, Clone)]
pub struct Established {
    /// The remote peer (version 0: topology versions come through gossip).
    pub remote: Peer,
    /// Negotiated protocol version.
    pub remote_version: u8,
    /// `Some` in password mode.
    pub keys: Option<SessionKeys>,
    /// Whether the TCP channel is encrypted (= `keys.is_some()`).
    pub encrypted: bool,
    /// We dialled this connection.
    pub outbound: bool,
    /// Connection UID, identical at both ends (our conn id XOR theirs): duplicate tie-break.
    pub conn_uid: u64,
    /// The remote trusts our address (spec §2.9).
    pub remote_trusts_us: bool,
    /// We trust the remote's address (as passed to [`Handshake::with_trust`]).
    pub we_trust_remote: bool,
    /// SHA-256 of the handshake transcript.
    pub transcript_hash: [u8; 32],
    /// Bytes received after the handshake; feed them to the [`super::conn::Conn`] first.
    pub leftover: Vec<u8>,
}

impl Established {
    /// UDP is encrypted unless there is no password or both ends trust each other (spec §2.9).
    pub fn udp_encrypted(&self) -> bool {
        self.encrypted && !(self.remote_trusts_us && self.we_trust_remote)
    }
}

/// What to do with a second connection to the same peer (spec §2.5): lower connection UID wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicateResolution {
    KeepExisting,
    KeepNew,
    DropBoth,
}

pub fn resolve_duplicate(existing_conn_uid: u64, new_conn_uid: u64) -> DuplicateResolution {
    match existing_conn_uid.cmp(&new_conn_uid) {
        std::cmp::Ordering::Less => DuplicateResolution::KeepExisting,
        std::cmp::Ordering::Greater => DuplicateResolution::KeepNew,
        std::cmp::Ordering::Equal => DuplicateResolution::DropBoth,
    }
}

/// Progress after feeding bytes.
#[derive(Debug)]
#[must_use]
pub enum Progress {
    /// Need more bytes (after draining [`Handshake::poll_transmit`]).
    Pending,
    /// Done. Drain [`Handshake::poll_transmit`] once more: it may hold our last message.
    Established(Box<Established>),
}

struct Hello {
    flags: u8,
    name: PeerName,
    uid: PeerUid,
    conn_id: u64,
    nonce: [u8; 32],
    public: [u8; 32],
    kdf: KdfParams,
    nickname: String,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + self.nickname.len());
        b.push(MSG_HELLO);
        b.push(self.flags);
        b.extend_from_slice(&self.name.to_bytes());
        b.extend_from_slice(&self.uid.0.to_be_bytes());
        b.extend_from_slice(&self.conn_id.to_be_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.public);
        b.extend_from_slice(&self.kdf.m_cost_kib.to_be_bytes());
        b.extend_from_slice(&self.kdf.t_cost.to_be_bytes());
        b.extend_from_slice(&self.kdf.p_cost.to_be_bytes());
        put_short_str(&mut b, &self.nickname);
        b
    }

    fn decode(body: &[u8]) -> Result<Hello, HandshakeError> {
        let bad = |_| HandshakeError::Malformed("truncated hello");
        let mut r = Reader::new(body);
        if r.u8().map_err(bad)? != MSG_HELLO {
            return Err(HandshakeError::Malformed("expected hello"));
        }
        let flags = r.u8().map_err(bad)?;
        let name = PeerName::from_bytes(r.array().map_err(bad)?);
        let uid = PeerUid(r.u64().map_err(bad)?);
        let conn_id = r.u64().map_err(bad)?;
        let nonce = r.array().map_err(bad)?;
        let public = r.array().map_err(bad)?;
        let kdf = KdfParams {
            m_cost_kib: r.u32().map_err(bad)?,
            t_cost: r.u32().map_err(bad)?,
            p_cost: r.u32().map_err(bad)?,
        };
        let nickname = r
            .short_str()
            .map_err(|_| HandshakeError::Malformed("bad nickname"))?
            .to_string();
        if !r.is_empty() {
            return Err(HandshakeError::Malformed("trailing bytes after hello"));
        }
        if name == PeerName::UNKNOWN || uid.0 == 0 {
            return Err(HandshakeError::Malformed("zero peer name or UID"));
        }
        if flags & !(FLAG_ENCRYPT | FLAG_TRUSTS_YOU) != 0 {
            return Err(HandshakeError::Malformed("unknown hello flags"));
        }
        Ok(Hello {
            flags,
            name,
            uid,
            conn_id,
            nonce,
            public,
            kdf,
            nickname,
        })
    }
}

enum State {
    Header,
    Hello,
    /// Password mode: waiting for the remote's key confirmation.
    Confirm {
        expect_key: [u8; 32],
        send_key: Option<[u8; 32]>,
        result: Box<Established>,
    },
    Done,
    Failed,
}

/// One connection's handshake. Create it when the TCP connection is up, drain
/// [`poll_transmit`](Self::poll_transmit) to the socket, feed received bytes to
/// [`on_bytes`](Self::on_bytes), and call [`handle_timeout`](Self::handle_timeout) at
/// [`poll_timeout`](Self::poll_timeout).
///
/// In password mode one `on_bytes` call runs Argon2id (tens of ms with the default parameters):
/// the shell should drive the handshake from a blocking-capable context.
pub struct Handshake {
    config: HandshakeConfig,
    outbound: bool,
    trust_remote: bool,
    state: State,
    rx: Vec<u8>,
    frames: FrameCodec,
    tx: Vec<Vec<u8>>,
    secret: Option<EphemeralSecret>,
    public: [u8; 32],
    nonce: [u8; 32],
    conn_id: u64,
    our_header: [u8; HEADER_LEN],
    their_header: [u8; HEADER_LEN],
    our_hello: Vec<u8>,
    version: u8,
    deadline: Instant,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("name", &self.config.name)
            .field("outbound", &self.outbound)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Start a handshake; our header and hello are queued at once (both sides send first).
    pub fn new<R: RngCore + CryptoRng>(
        config: &HandshakeConfig,
        outbound: bool,
        now: Instant,
        rng: &mut R,
    ) -> Self {
        Self::with_trust(config, outbound, false, now, rng)
    }

    /// As [`new`](Self::new); `trust_remote` = the remote address is in our trusted subnets.
    pub fn with_trust<R: RngCore + CryptoRng>(
        config: &HandshakeConfig,
        outbound: bool,
        trust_remote: bool,
        now: Instant,
        rng: &mut R,
    ) -> Self {
        let secret = EphemeralSecret::random_from_rng(&mut *rng);
        let public = PublicKey::from(&secret).to_bytes();
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let conn_id = rng.next_u64();
        let mut our_header = [0u8; HEADER_LEN];
        our_header[..5].copy_from_slice(PROTOCOL_MAGIC);
        our_header[5] = config.min_version;
        our_header[6] = config.max_version;
        let encrypted = config.encrypted();
        let mut flags = 0;
        if encrypted {
            flags |= FLAG_ENCRYPT;
        }
        if trust_remote {
            flags |= FLAG_TRUSTS_YOU;
        }
        let mut nickname = config.nickname.clone();
        if nickname.len() > MAX_NICKNAME_LEN {
            let mut end = MAX_NICKNAME_LEN;
            while !nickname.is_char_boundary(end) {
                end -= 1;
            }
            nickname.truncate(end);
        }
        let hello = Hello {
            flags,
            name: config.name,
            uid: config.uid,
            conn_id,
            nonce,
            public,
            kdf: if encrypted {
                config.kdf
            } else {
                KdfParams {
                    m_cost_kib: 0,
                    t_cost: 0,
                    p_cost: 0,
                }
            },
            nickname,
        }
        .encode();
        let mut first = our_header.to_vec();
        // A hello is far below the cap.
        let _ = FrameCodec::encode(&hello, MAX_HANDSHAKE_FRAME, &mut first);
        Handshake {
            config: config.clone(),
            outbound,
            trust_remote,
            state: State::Header,
            rx: Vec::new(),
            frames: FrameCodec::new(MAX_HANDSHAKE_FRAME),
            tx: vec![first],
            secret: Some(secret),
            public,
            nonce,
            conn_id,
            our_header,
            their_header: [0; HEADER_LEN],
            our_hello: hello,
            version: 0,
            deadline: now + HEADER_TIMEOUT,
        }
    }

    /// Bytes to write to the socket, in order.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.tx.is_empty() {
            None
        } else {
            Some(self.tx.remove(0))
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Done | State::Failed => None,
            _ => Some(self.deadline),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), HandshakeError> {
        if matches!(self.state, State::Done | State::Failed) || now < self.deadline {
            return Ok(());
        }
        self.state = State::Failed;
        Err(HandshakeError::Timeout)
    }

    /// Feed received bytes.
    pub fn on_bytes(&mut self, now: Instant, data: &[u8]) -> Result<Progress, HandshakeError> {
        match self.state {
            State::Failed => return Err(HandshakeError::Failed),
            State::Done => return Err(HandshakeError::Malformed("handshake already complete")),
            _ => {}
        }
        if now >= self.deadline {
            self.state = State::Failed;
            return Err(HandshakeError::Timeout);
        }
        match self.step(now, data) {
            Ok(p) => Ok(p),
            Err(e) => {
                if let Some(code) = e.abort_code() {
                    let mut out = Vec::new();
                    let _ = FrameCodec::encode(&[MSG_ABORT, code], MAX_HANDSHAKE_FRAME, &mut out);
                    self.tx.push(out);
                }
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    fn step(&mut self, now: Instant, data: &[u8]) -> Result<Progress, HandshakeError> {
        if matches!(self.state, State::Header) {
            let need = HEADER_LEN - self.rx.len();
            let take = need.min(data.len());
            self.rx
                .extend_from_slice(data.get(..take).unwrap_or_default());
            let rest = data.get(take..).unwrap_or_default();
            // Reject a wrong magic as soon as its bytes are in.
            let seen = self.rx.len().min(PROTOCOL_MAGIC.len());
            if self.rx.get(..seen) != PROTOCOL_MAGIC.get(..seen) {
                return Err(HandshakeError::BadMagic);
            }
            if self.rx.len() < HEADER_LEN {
                return Ok(Progress::Pending);
            }
            self.their_header.copy_from_slice(&self.rx);
            let (their_min, their_max) = (self.their_header[5], self.their_header[6]);
            let lo = self.config.min_version.max(their_min);
            let hi = self.config.max_version.min(their_max);
            if lo > hi || their_min > their_max {
                return Err(HandshakeError::VersionMismatch {
                    ours: (self.config.min_version, self.config.max_version),
                    theirs: (their_min, their_max),
                });
            }
            self.version = hi;
            self.state = State::Hello;
            self.deadline = now + INTRO_TIMEOUT;
            self.frames.push(rest);
        } else {
            self.frames.push(data);
        }
        loop {
            if matches!(self.state, State::Done) {
                return Err(HandshakeError::Malformed("handshake already complete"));
            }
            let Some(frame) = self.frames.next_frame()? else {
                return Ok(Progress::Pending);
            };
            if frame.first() == Some(&MSG_ABORT) {
                let code = frame.get(1).copied().unwrap_or(0);
                return Err(HandshakeError::from_abort_code(code));
            }
            if let Some(est) = self.on_frame(&frame)? {
                let mut est = est;
                let frames = std::mem::replace(&mut self.frames, FrameCodec::new(0));
                est.leftover = frames.into_remaining();
                self.state = State::Done;
                return Ok(Progress::Established(est));
            }
        }
    }

    fn on_frame(&mut self, frame: &[u8]) -> Result<Option<Box<Established>>, HandshakeError> {
        match std::mem::replace(&mut self.state, State::Failed) {
            State::Hello => self.on_hello(frame),
            State::Confirm {
                expect_key,
                send_key,
                result,
            } => {
                let mut r = Reader::new(frame);
                let bad = |_| HandshakeError::Malformed("truncated confirm");
                if r.u8().map_err(bad)? != MSG_CONFIRM {
                    return Err(HandshakeError::Malformed("expected confirm"));
                }
                let tag = r.bytes(32).map_err(bad)?;
                if !r.is_empty() {
                    return Err(HandshakeError::Malformed("trailing bytes after confirm"));
                }
                let mut mac = Hmac::<Sha256>::new_from_slice(&expect_key)
                    .expect("HMAC accepts any key length");
                mac.update(&result.transcript_hash);
                mac.verify_slice(tag)
                    .map_err(|_| HandshakeError::PasswordMismatch)?;
                if let Some(k) = send_key {
                    self.send_confirm(&k, &result.transcript_hash);
                }
                Ok(Some(result))
            }
            _ => Err(HandshakeError::Malformed("unexpected handshake frame")),
        }
    }

    fn send_confirm(&mut self, key: &[u8; 32], th: &[u8; 32]) {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
        mac.update(th);
        let mut body = vec![MSG_CONFIRM];
        body.extend_from_slice(&mac.finalize().into_bytes());
        let mut out = Vec::new();
        let _ = FrameCodec::encode(&body, MAX_HANDSHAKE_FRAME, &mut out);
        self.tx.push(out);
    }

    fn on_hello(&mut self, frame: &[u8]) -> Result<Option<Box<Established>>, HandshakeError> {
        let hello = Hello::decode(frame)?;
        if hello.name == self.config.name {
            return Err(if hello.uid == self.config.uid {
                HandshakeError::ConnectToSelf
            } else {
                HandshakeError::NameCollision { name: hello.name }
            });
        }
        let we_encrypt = self.config.encrypted();
        let they_encrypt = hello.flags & FLAG_ENCRYPT != 0;
        if we_encrypt != they_encrypt {
            return Err(HandshakeError::EncryptionMismatch { we_encrypt });
        }
        if we_encrypt && hello.kdf != self.config.kdf {
            return Err(HandshakeError::KdfMismatch);
        }
        // Transcript: label, version, both headers and both hellos, in dialler-then-listener order.
        let (hdr_i, hdr_r, hello_i, hello_r): (&[u8], &[u8], &[u8], &[u8]) = if self.outbound {
            (&self.our_header, &self.their_header, &self.our_hello, frame)
        } else {
            (&self.their_header, &self.our_header, frame, &self.our_hello)
        };
        let mut h = Sha256::new();
        h.update(LABEL);
        h.update([self.version]);
        for part in [hdr_i, hdr_r, hello_i, hello_r] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part);
        }
        let th: [u8; 32] = h.finalize().into();
        let remote = Peer {
            name: hello.name,
            nickname: hello.nickname.clone(),
            uid: hello.uid,
            version: 0,
        };
        let mut est = Box::new(Established {
            remote,
            remote_version: self.version,
            keys: None,
            encrypted: we_encrypt,
            outbound: self.outbound,
            conn_uid: self.conn_id ^ hello.conn_id,
            remote_trusts_us: hello.flags & FLAG_TRUSTS_YOU != 0,
            we_trust_remote: self.trust_remote,
            transcript_hash: th,
            leftover: Vec::new(),
        });
        if !we_encrypt {
            return Ok(Some(est));
        }
        let secret = self.secret.take().ok_or(HandshakeError::Failed)?;
        let shared = secret.diffie_hellman(&PublicKey::from(hello.public));
        if !shared.was_contributory() {
            return Err(HandshakeError::WeakKey);
        }
        let stretched = self.stretch(&hello.nonce)?;
        let (keys, conf_i, conf_r) =
            derive_keys(&stretched, shared.as_bytes(), th, 0, self.outbound);
        est.keys = Some(keys);
        if self.outbound {
            self.send_confirm(&conf_i, &th);
            self.state = State::Confirm {
                expect_key: conf_r,
                send_key: None,
                result: est,
            };
        } else {
            self.state = State::Confirm {
                expect_key: conf_i,
                send_key: Some(conf_r),
                result: est,
            };
        }
        Ok(None)
    }

    /// Argon2id(password, salt = H(label, dialler nonce, listener nonce)).
    fn stretch(&self, their_nonce: &[u8; 32]) -> Result<[u8; 32], HandshakeError> {
        let (n_i, n_r) = if self.outbound {
            (&self.nonce, their_nonce)
        } else {
            (their_nonce, &self.nonce)
        };
        let mut h = Sha256::new();
        h.update(LABEL);
        h.update(b" salt");
        h.update(n_i);
        h.update(n_r);
        let salt: [u8; 32] = h.finalize().into();
        let kdf = self.config.kdf;
        let params = argon2::Params::new(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost, Some(32))
            .map_err(|e| HandshakeError::Kdf(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        let password = self.config.password.as_deref().unwrap_or_default();
        argon
            .hash_password_into(password, &salt, &mut out)
            .map_err(|e| HandshakeError::Kdf(e.to_string()))?;
        Ok(out)
    }

    /// Our ephemeral public key (for logs/tests).
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::OsRng;

    pub(crate) fn config(name: u64, password: Option<&str>) -> HandshakeConfig {
        let mut c = HandshakeConfig::new(
            PeerName::from_u64(name),
            format!("host{name}"),
            PeerUid(name * 1000 + 7),
        );
        c.password = password.map(|p| p.as_bytes().to_vec());
        c.kdf = KdfParams::INSECURE_FAST;
        c
    }

    type Outcome = Result<Established, HandshakeError>;

    /// Wire a dialler and a listener together in memory until both finish or stall.
    pub(crate) fn pair(a: &HandshakeConfig, b: &HandshakeConfig) -> (Outcome, Outcome) {
        let now = Instant::now();
        let mut hs = [
            Handshake::new(a, true, now, &mut OsRng),
            Handshake::new(b, false, now, &mut OsRng),
        ];
        let mut out: [Option<Outcome>; 2] = [None, None];
        for _ in 0..10 {
            for from in 0..2 {
                let to = 1 - from;
                while let Some(bytes) = hs[from].poll_transmit() {
                    if out[to].is_none() {
                        match hs[to].on_bytes(now, &bytes) {
                            Ok(Progress::Pending) => {}
                            Ok(Progress::Established(e)) => out[to] = Some(Ok(*e)),
                            Err(e) => out[to] = Some(Err(e)),
                        }
                    }
                }
            }
        }
        let [x, y] = out;
        (
            x.unwrap_or(Err(HandshakeError::Timeout)),
            y.unwrap_or(Err(HandshakeError::Timeout)),
        )
    }

    #[test]
    fn plain_success() {
        let (a, b) = pair(&config(1, None), &config(2, None));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.remote.name, PeerName::from_u64(2));
        assert_eq!(a.remote.nickname, "host2");
        assert_eq!(a.remote.uid, PeerUid(2007));
        assert_eq!(b.remote.name, PeerName::from_u64(1));
        assert_eq!(a.remote_version, PROTOCOL_MAX_VERSION);
        assert!(!a.encrypted && !b.encrypted && a.keys.is_none());
        assert_eq!(a.conn_uid, b.conn_uid);
        assert_eq!(a.transcript_hash, b.transcript_hash);
        assert!(a.outbound && !b.outbound);
    }

    #[test]
    fn encrypted_success_keys_match_crosswise() {
        let (a, b) = pair(&config(1, Some("s3cret")), &config(2, Some("s3cret")));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.encrypted && b.encrypted);
        let (ka, kb) = (a.keys.unwrap(), b.keys.unwrap());
        assert_eq!(ka.tcp_send, kb.tcp_recv);
        assert_eq!(ka.tcp_recv, kb.tcp_send);
        assert_eq!(ka.udp_send, kb.udp_recv);
        assert_eq!(ka.udp_recv, kb.udp_send);
        assert_eq!(ka.chain, kb.chain);
        assert_eq!(ka.epoch, 0);
        let all = [ka.tcp_send, ka.tcp_recv, ka.udp_send, ka.udp_recv, ka.chain];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y, "keys must be independent");
            }
        }
        assert!(format!("{ka:?}").contains("redacted"));
        // Fresh ephemeral keys: a second session gets other keys.
        let (c, _) = pair(&config(1, Some("s3cret")), &config(2, Some("s3cret")));
        assert_ne!(c.unwrap().keys.unwrap().tcp_send, ka.tcp_send);
    }

    #[test]
    fn wrong_password_fails_both_sides() {
        let (a, b) = pair(&config(1, Some("one")), &config(2, Some("two")));
        assert_eq!(a.unwrap_err(), HandshakeError::PasswordMismatch);
        assert_eq!(b.unwrap_err(), HandshakeError::PasswordMismatch);
    }

    #[test]
    fn password_vs_none_is_encryption_mismatch() {
        let (a, b) = pair(&config(1, Some("one")), &config(2, None));
        assert_eq!(
            a.unwrap_err(),
            HandshakeError::EncryptionMismatch { we_encrypt: true }
        );
        assert_eq!(
            b.unwrap_err(),
            HandshakeError::EncryptionMismatch { we_encrypt: false }
        );
        let (a, b) = pair(&config(1, None), &config(2, Some("x")));
        assert!(matches!(a, Err(HandshakeError::EncryptionMismatch { .. })));
        assert!(matches!(b, Err(HandshakeError::EncryptionMismatch { .. })));
    }

    #[test]
    fn kdf_params_must_match() {
        let a = config(1, Some("p"));
        let mut b = config(2, Some("p"));
        b.kdf.t_cost = 2;
        let (a, b) = pair(&a, &b);
        assert_eq!(a.unwrap_err(), HandshakeError::KdfMismatch);
        assert_eq!(b.unwrap_err(), HandshakeError::KdfMismatch);
    }

    #[test]
    fn version_mismatch() {
        let a = config(1, None);
        let mut b = config(2, None);
        b.min_version = 4;
        b.max_version = 5;
        let (ra, rb) = pair(&a, &b);
        assert_eq!(
            ra.unwrap_err(),
            HandshakeError::VersionMismatch {
                ours: (3, 3),
                theirs: (4, 5)
            }
        );
        assert!(matches!(rb, Err(HandshakeError::VersionMismatch { .. })));
    }

    #[test]
    fn go_weave_header_is_version_mismatch() {
        let mut hs = Handshake::new(&config(1, None), false, Instant::now(), &mut OsRng);
        let first = hs.poll_transmit().unwrap();
        assert_eq!(&first[..7], b"weave\x03\x03");
        // What Weave 2.8 sends: header with range 1..2, then (v2) a flag byte.
        let err = hs
            .on_bytes(Instant::now(), b"weave\x01\x02\x00")
            .unwrap_err();
        assert_eq!(
            err,
            HandshakeError::VersionMismatch {
                ours: (3, 3),
                theirs: (1, 2)
            }
        );
        assert_eq!(
            err.to_string(),
            "remote version range [1,2] is incompatible with ours [3,3]"
        );
        let mut hs = Handshake::new(&config(1, None), false, Instant::now(), &mut OsRng);
        assert_eq!(
            hs.on_bytes(Instant::now(), b"GET / HTTP/1.1\r\n")
                .unwrap_err(),
            HandshakeError::BadMagic
        );
    }

    #[test]
    fn connect_to_self_refused() {
        let c = config(1, None);
        let (a, b) = pair(&c, &c);
        assert_eq!(a.unwrap_err(), HandshakeError::ConnectToSelf);
        assert_eq!(b.unwrap_err(), HandshakeError::ConnectToSelf);
        assert!(HandshakeError::ConnectToSelf.is_permanent());
        let mut other = c.clone();
        other.uid = PeerUid(99);
        let (a, _) = pair(&c, &other);
        assert!(matches!(a, Err(HandshakeError::NameCollision { .. })));
    }

    #[test]
    fn byte_at_a_time_and_leftover() {
        let now = Instant::now();
        let a_cfg = config(1, Some("pw"));
        let b_cfg = config(2, Some("pw"));
        let mut a = Handshake::new(&a_cfg, true, now, &mut OsRng);
        let mut b = Handshake::new(&b_cfg, false, now, &mut OsRng);
        let mut to_b = Vec::new();
        while let Some(x) = a.poll_transmit() {
            to_b.extend(x);
        }
        let mut to_a = Vec::new();
        while let Some(x) = b.poll_transmit() {
            to_a.extend(x);
        }
        for byte in &to_a {
            assert!(matches!(a.on_bytes(now, &[*byte]), Ok(Progress::Pending)));
        }
        // a has sent its confirm now
        while let Some(x) = a.poll_transmit() {
            to_b.extend(x);
        }
        let mut eb = None;
        for byte in &to_b {
            if let Progress::Established(e) = b.on_bytes(now, &[*byte]).unwrap() {
                eb = Some(e);
            }
        }
        let eb = eb.unwrap();
        let mut fin = b.poll_transmit().unwrap();
        fin.extend_from_slice(b"extra");
        let Progress::Established(ea) = a.on_bytes(now, &fin).unwrap() else {
            panic!("a not established")
        };
        assert_eq!(ea.leftover, b"extra");
        assert_eq!(ea.keys.unwrap().tcp_send, eb.keys.unwrap().tcp_recv);
    }

    #[test]
    fn timeout() {
        let now = Instant::now();
        let mut a = Handshake::new(&config(1, None), true, now, &mut OsRng);
        assert_eq!(a.poll_timeout(), Some(now + HEADER_TIMEOUT));
        assert!(a.handle_timeout(now + Duration::from_secs(1)).is_ok());
        assert_eq!(
            a.handle_timeout(now + HEADER_TIMEOUT),
            Err(HandshakeError::Timeout)
        );
    }

    #[test]
    fn oversized_frame_rejected() {
        let now = Instant::now();
        let mut a = Handshake::new(&config(1, None), true, now, &mut OsRng);
        let mut input = b"weave\x03\x03".to_vec();
        input.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            a.on_bytes(now, &input),
            Err(HandshakeError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    #[test]
    fn trust_flags() {
        let now = Instant::now();
        let (a_cfg, b_cfg) = (config(1, Some("pw")), config(2, Some("pw")));
        for (ta, tb, udp_enc) in [
            (true, true, false),
            (true, false, true),
            (false, false, true),
        ] {
            let mut a = Handshake::with_trust(&a_cfg, true, ta, now, &mut OsRng);
            let mut b = Handshake::with_trust(&b_cfg, false, tb, now, &mut OsRng);
            let mut done = (None, None);
            for _ in 0..4 {
                while let Some(x) = a.poll_transmit() {
                    if let Ok(Progress::Established(e)) = b.on_bytes(now, &x) {
                        done.1 = Some(e);
                    }
                }
                while let Some(x) = b.poll_transmit() {
                    if let Ok(Progress::Established(e)) = a.on_bytes(now, &x) {
                        done.0 = Some(e);
                    }
                }
            }
            let (ea, eb) = (done.0.unwrap(), done.1.unwrap());
            assert_eq!(ea.remote_trusts_us, tb);
            assert_eq!(eb.remote_trusts_us, ta);
            assert_eq!(ea.udp_encrypted(), udp_enc);
            assert_eq!(eb.udp_encrypted(), udp_enc);
            assert!(ea.encrypted, "TCP stays encrypted");
        }
    }

    #[test]
    fn duplicate_resolution() {
        assert_eq!(resolve_duplicate(1, 2), DuplicateResolution::KeepExisting);
        assert_eq!(resolve_duplicate(3, 2), DuplicateResolution::KeepNew);
        assert_eq!(resolve_duplicate(2, 2), DuplicateResolution::DropBoth);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..6), valid_header in any::<bool>(), pw in any::<bool>()) {
            let now = Instant::now();
            let cfg = config(1, pw.then_some("pw"));
            let mut hs = Handshake::new(&cfg, false, now, &mut OsRng);
            if valid_header {
                let _ = hs.on_bytes(now, b"weave\x03\x03");
            }
            for c in chunks {
                if hs.on_bytes(now, &c).is_err() {
                    break;
                }
            }
            while hs.poll_transmit().is_some() {}
        }

        #[test]
        fn truncated_valid_stream_is_pending_or_error(cut in 0usize..400) {
            let now = Instant::now();
            let mut a = Handshake::new(&config(1, None), true, now, &mut OsRng);
            let mut b = Handshake::new(&config(2, None), false, now, &mut OsRng);
            let mut bytes = Vec::new();
            while let Some(x) = a.poll_transmit() { bytes.extend(x); }
            let cut = cut.min(bytes.len());
            let r = b.on_bytes(now, &bytes[..cut]);
            if cut < bytes.len() {
                prop_assert!(matches!(r, Ok(Progress::Pending)));
            } else {
                prop_assert!(matches!(r, Ok(Progress::Established(_))));
            }
        }

        #[test]
        fn hello_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Hello::decode(&b);
        }
    }
}

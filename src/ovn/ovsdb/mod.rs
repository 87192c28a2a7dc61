//! An OVSDB client (RFC 7047, with the `ovsdb-server(7)` extensions
//! `monitor_cond`, `monitor_cond_since`, `monitor_cond_change`,
//! `update2`/`update3`), for the OVN Southbound database and the local
//! Open_vSwitch database.
//!
//! Why our own: the Rust crates on crates.io (`ovsdb` 0.0.6, `ovsdb-client`
//! 0.0.1 on jsonrpsee, both tokio, both early 0.0.x releases, checked in
//! 2026-12) speak plain `monitor` only, without `monitor_cond_since`,
//! resume, TLS or probes; libovsdb (Go) and the Python IDL are other
//! languages. The protocol part we need is small:
//! [`frame`] (concatenated JSON values), [`datum`] (values and diffs), and
//! [`Conn`] here (requests, replies, notifications, echo).
//!
//! Why blocking IO on a thread of its own, not the compio loops: OVSDB
//! traffic is never on a guest's request path. It is one long-lived
//! connection per database, whose work is applying diffs to a replica that
//! the serving loops then read (published as a snapshot behind an `Arc`,
//! see [`crate::ovn::replica`]). A dedicated thread with std sockets and
//! `rustls::StreamOwned` is a few hundred lines simpler than a second
//! owned-buffer TLS pump on compio, and an OVSDB server that stalls, floods
//! or dies cannot delay an accept, as with `agent::report`.
//!
//! Remotes are OVS's strings: `tcp:HOST:PORT`, `ssl:HOST:PORT`,
//! `unix:PATH`, comma-separated to try in turn ([`Remote::parse_list`]).
//! `ssl:` is mutual TLS with the private key, certificate and CA
//! certificate files (Neutron's `ovn_sb_private_key`,
//! `ovn_sb_certificate`, `ovn_sb_ca_cert`); the server's chain is verified
//! against the CA, its name is not checked, as OVS's own stream-ssl does
//! not.
//!
//! Liveness ([`Conn::next_event`]): the server's `echo` requests are
//! answered at once. When nothing has arrived for `probe_interval` we send
//! our own `echo`; if nothing arrives in a further `probe_interval`, the
//! connection is declared dead ([`OvsdbError::ProbeTimeout`]), which is
//! OVS's `reconnect` inactivity probe. Zero disables the probe.
//!
//! Rejected: jsonrpsee (JSON-RPC 2.0 framing; OVSDB is 1.0 with bare
//! concatenated values); running it on compio (see above).

pub mod datum;
pub mod frame;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
    StreamOwned,
};
use serde_json::{json, Value};

use frame::{Decoder, FrameError};

/// Largest single message accepted from a server. The initial snapshot of a
/// plain `monitor` (no conditions) of a 10 000-port Southbound DB is about
/// 15 MB; anything past this is refused and the connection dropped.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Bytes read per socket read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// How often a blocked read wakes to check the stop flag and the probe.
const POLL_TICK: Duration = Duration::from_millis(200);
/// Neutron's `[ovn] ovsdb_probe_interval` default (milliseconds there).
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// Neutron's `[ovn] ovsdb_connection_timeout` default.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(180);

/// Errors of the OVSDB client.
#[derive(Debug, thiserror::Error)]
pub enum OvsdbError {
    /// A remote string we cannot use.
    #[error("bad OVSDB remote {0:?}: {1}")]
    BadRemote(String, String),
    /// TLS files or settings.
    #[error("OVSDB TLS: {0}")]
    Tls(String),
    /// Connect, read or write failed.
    #[error("OVSDB {remote}: {source}")]
    Io {
        /// The remote.
        remote: String,
        /// What happened.
        source: io::Error,
    },
    /// The server closed the connection.
    #[error("OVSDB {0}: connection closed by the server")]
    Closed(String),
    /// Our echo went unanswered for a probe interval.
    #[error("OVSDB {0}: no answer to the inactivity probe, dropping the connection")]
    ProbeTimeout(String),
    /// Bad framing from the server.
    #[error("OVSDB {0}: {1}")]
    Frame(String, FrameError),
    /// A message that is not the JSON-RPC 1.0 OVSDB speaks, or data that
    /// does not fit the schema.
    #[error("OVSDB {0}: protocol error: {1}")]
    Protocol(String, String),
    /// The server answered a request with an error.
    #[error("OVSDB {remote}: {method} failed: {error}")]
    Rpc {
        /// The remote.
        remote: String,
        /// The request's method.
        method: String,
        /// The server's `error` member.
        error: Value,
    },
    /// A `transact` operation failed.
    #[error("OVSDB transaction failed: {0}")]
    Transaction(Value),
    /// Asked to stop.
    #[error("stopped")]
    Stopped,
}

/// One OVS remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// `tcp:HOST:PORT`
    Tcp(String, u16),
    /// `ssl:HOST:PORT`
    Ssl(String, u16),
    /// `unix:PATH`
    Unix(PathBuf),
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        match self {
            Remote::Tcp(h, p) => write!(f, "tcp:{}:{p}", host(h)),
            Remote::Ssl(h, p) => write!(f, "ssl:{}:{p}", host(h)),
            Remote::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Remote {
    /// Parse one remote.
    ///
    /// # Errors
    /// Not `tcp:`, `ssl:` or `unix:`, or no port.
    pub fn parse(s: &str) -> Result<Remote, OvsdbError> {
        let err = |why: &str| OvsdbError::BadRemote(s.to_string(), why.to_string());
        let s_trim = s.trim();
        let (kind, rest) = s_trim
            .split_once(':')
            .ok_or_else(|| err("expected tcp:, ssl: or unix:"))?;
        match kind {
            "unix" if !rest.is_empty() => Ok(Remote::Unix(PathBuf::from(rest))),
            "tcp" | "ssl" => {
                let (host, port) = if let Some(r) = rest.strip_prefix('[') {
                    let (h, p) = r
                        .split_once("]:")
                        .ok_or_else(|| err("expected [HOST]:PORT"))?;
                    (h, p)
                } else {
                    rest.rsplit_once(':')
                        .ok_or_else(|| err("expected HOST:PORT"))?
                };
                if host.is_empty() {
                    return Err(err("empty host"));
                }
                let port: u16 = port.parse().map_err(|_| err("bad port"))?;
                Ok(if kind == "tcp" {
                    Remote::Tcp(host.to_string(), port)
                } else {
                    Remote::Ssl(host.to_string(), port)
                })
            }
            "ptcp" | "pssl" | "punix" => Err(err("a passive remote; metaproxy connects out")),
            _ => Err(err("expected tcp:, ssl: or unix:")),
        }
    }

    /// Parse a comma-separated list (Neutron's `ovn_sb_connection`).
    ///
    /// # Errors
    /// An empty list or a bad entry.
    pub fn parse_list(s: &str) -> Result<Vec<Remote>, OvsdbError> {
        let list = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Remote::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(OvsdbError::BadRemote(s.to_string(), "no remote".into()));
        }
        Ok(list)
    }
}

/// The three TLS files of an `ssl:` remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `ovn_sb_private_key`
    pub private_key: PathBuf,
    /// `ovn_sb_certificate`
    pub certificate: PathBuf,
    /// `ovn_sb_ca_cert`
    pub ca_cert: PathBuf,
}

/// Build the rustls config for `ssl:` remotes: our certificate and key, the
/// CA's chain verified, no name check.
///
/// # Errors
/// A file cannot be read or holds nothing usable; the error names it.
pub fn tls_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, OvsdbError> {
    let bad =
        |p: &Path, e: &dyn std::fmt::Display| OvsdbError::Tls(format!("{}: {e}", p.display()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca_cert)
        .map_err(|e| bad(&files.ca_cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&files.ca_cert, &e))?;
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(bad(&files.ca_cert, &"no usable CA certificate"));
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(&files.ca_cert, &e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.certificate)
        .map_err(|e| bad(&files.certificate, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&files.certificate, &e))?;
    if chain.is_empty() {
        return Err(bad(&files.certificate, &"no certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.private_key)
        .map_err(|e| bad(&files.private_key, &e))?;
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OvsdbError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&files.private_key, &e))?;
    Ok(Arc::new(cfg))
}

/// WebPKI chain verification without the name check. rustls checks the
/// chain first and the name last, so a `NotValidForName` error means the
/// chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn set_read_timeout(&self, d: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(d)),
            Stream::Unix(s) => s.set_read_timeout(Some(d)),
            Stream::Tls(s) => s.sock.set_read_timeout(Some(d)),
        }
    }
    fn set_write_timeout(&self, d: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(d)),
            Stream::Unix(s) => s.set_write_timeout(Some(d)),
            Stream::Tls(s) => s.sock.set_write_timeout(Some(d)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// Connect (and write) timeout (`ovsdb_connection_timeout`).
    pub connect_timeout: Duration,
    /// Inactivity probe (`ovsdb_probe_interval`); zero disables it.
    pub probe_interval: Duration,
    /// Needed for `ssl:` remotes.
    pub tls: Option<Arc<ClientConfig>>,
    /// Largest message accepted.
    pub max_message_bytes: usize,
}

impl Default for ConnOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECTION_TIMEOUT,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            tls: None,
            max_message_bytes: MAX_MESSAGE_BYTES,
        }
    }
}

/// Something the server sent that is not an echo.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A reply to request `id`: `Ok(result)` or `Err(error)`.
    Reply(u64, Result<Value, Value>),
    /// A notification (`update`, `update2`, `update3`, `locked` ...).
    Notify(String, Value),
}

/// Counters of one connection, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Echo requests we sent (inactivity probes).
    pub echoes_sent: u64,
    /// Echo requests from the server we answered.
    pub echoes_answered: u64,
}

/// One JSON-RPC connection to an OVSDB server.
pub struct Conn {
    remote: String,
    stream: Stream,
    dec: Decoder,
    next_id: u64,
    probe: Duration,
    last_rx: Instant,
    echo_sent: Option<Instant>,
    pending: VecDeque<Event>,
    rbuf: Vec<u8>,
    /// Counters.
    pub stats: ConnStats,
    /// Also counts our echo probes, for a reader on another thread.
    pub echo_counter: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Connect to `remote`.
    ///
    /// # Errors
    /// Resolution, connect or TLS handshake failures; `ssl:` without TLS files.
    pub fn open(remote: &Remote, opts: &ConnOptions) -> Result<Conn, OvsdbError> {
        let name = remote.to_string();
        let io_err = |e: io::Error| OvsdbError::Io {
            remote: name.clone(),
            source: e,
        };
        let tcp = |h: &str, p: u16| -> Result<TcpStream, OvsdbError> {
            let addrs: Vec<_> = (h, p).to_socket_addrs().map_err(io_err)?.collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, opts.connect_timeout) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(s);
                    }
                    Err(e) => last = e,
                }
            }
            Err(io_err(last))
        };
        let stream = match remote {
            Remote::Tcp(h, p) => Stream::Tcp(tcp(h, *p)?),
            Remote::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(io_err)?),
            Remote::Ssl(h, p) => {
                let cfg = opts.tls.clone().ok_or_else(|| {
                    OvsdbError::Tls(format!(
                        "{name} needs the private key, certificate and CA certificate"
                    ))
                })?;
                let sock = tcp(h, *p)?;
                let sn = ServerName::try_from(h.clone())
                    .map_err(|e| OvsdbError::Tls(format!("{name}: {e}")))?;
                let mut conn = ClientConnection::new(cfg, sn)
                    .map_err(|e| OvsdbError::Tls(format!("{name}: {e}")))?;
                sock.set_read_timeout(Some(opts.connect_timeout))
                    .map_err(io_err)?;
                sock.set_write_timeout(Some(opts.connect_timeout))
                    .map_err(io_err)?;
                let mut sock = sock;
                while conn.is_handshaking() {
                    conn.complete_io(&mut sock)
                        .map_err(|e| OvsdbError::Tls(format!("{name}: handshake: {e}")))?;
                }
                Stream::Tls(Box::new(StreamOwned::new(conn, sock)))
            }
        };
        stream
            .set_write_timeout(opts.connect_timeout)
            .map_err(io_err)?;
        stream.set_read_timeout(POLL_TICK).map_err(io_err)?;
        Ok(Conn {
            remote: name,
            stream,
            dec: Decoder::new(opts.max_message_bytes),
            next_id: 1,
            probe: opts.probe_interval,
            last_rx: Instant::now(),
            echo_sent: None,
            pending: VecDeque::new(),
            rbuf: vec![0; READ_CHUNK_BYTES],
            stats: ConnStats::default(),
            echo_counter: None,
        })
    }

    /// The remote this connection goes to.
    pub fn remote(&self) -> &str {
        &self.remote
    }

    fn send(&mut self, v: &Value) -> Result<(), OvsdbError> {
        let bytes = serde_json::to_vec(v)
            .map_err(|e| OvsdbError::Protocol(self.remote.clone(), e.to_string()))?;
        self.stream
            .write_all(&bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| OvsdbError::Io {
                remote: self.remote.clone(),
                source: e,
            })
    }

    /// Send a request; its reply comes back as [`Event::Reply`] with the
    /// returned id.
    ///
    /// # Errors
    /// The write failed.
    pub fn request(&mut self, method: &str, params: Value) -> Result<u64, OvsdbError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"method": method, "params": params, "id": id}))?;
        Ok(id)
    }

    /// Send a request and wait for its reply; notifications that arrive
    /// meanwhile are kept for [`Conn::next_event`].
    ///
    /// # Errors
    /// IO, a dead connection, or the server's `error` ([`OvsdbError::Rpc`]).
    pub fn call(
        &mut self,
        method: &str,
        params: Value,
        stop: &dyn Fn() -> bool,
    ) -> Result<Value, OvsdbError> {
        let id = self.request(method, params)?;
        let mut held = VecDeque::new();
        let out = loop {
            match self.read_event(stop) {
                Ok(Event::Reply(rid, r)) if rid == id => {
                    break r.map_err(|error| OvsdbError::Rpc {
                        remote: self.remote.clone(),
                        method: method.to_string(),
                        error,
                    })
                }
                Ok(other) => held.push_back(other),
                Err(e) => break Err(e),
            }
        };
        // Invariant: events keep their arrival order; those from before the
        // call come out of `next_event` first.
        self.pending.append(&mut held);
        out
    }

    /// The next reply or notification. Echo requests are answered here;
    /// our own probes are sent from here.
    ///
    /// # Errors
    /// IO, the server closing, a probe timeout, bad framing, or `stop()`.
    pub fn next_event(&mut self, stop: &dyn Fn() -> bool) -> Result<Event, OvsdbError> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(e);
        }
        self.read_event(stop)
    }

    fn read_event(&mut self, stop: &dyn Fn() -> bool) -> Result<Event, OvsdbError> {
        loop {
            while let Some(v) = self
                .dec
                .next_value()
                .map_err(|e| OvsdbError::Frame(self.remote.clone(), e))?
            {
                if let Some(ev) = self.handle(v)? {
                    return Ok(ev);
                }
            }
            if stop() {
                return Err(OvsdbError::Stopped);
            }
            let room = self.dec.room().min(self.rbuf.len());
            if room == 0 {
                return Err(OvsdbError::Frame(
                    self.remote.clone(),
                    FrameError::TooLarge(self.dec.room()),
                ));
            }
            match self.stream.read(&mut self.rbuf[..room]) {
                Ok(0) => return Err(OvsdbError::Closed(self.remote.clone())),
                Ok(n) => {
                    self.last_rx = Instant::now();
                    self.echo_sent = None;
                    self.dec
                        .feed(&self.rbuf[..n])
                        .map_err(|e| OvsdbError::Frame(self.remote.clone(), e))?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.probe_tick()?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(OvsdbError::Io {
                        remote: self.remote.clone(),
                        source: e,
                    })
                }
            }
        }
    }

    fn probe_tick(&mut self) -> Result<(), OvsdbError> {
        if self.probe.is_zero() {
            return Ok(());
        }
        match self.echo_sent {
            Some(at) if at.elapsed() >= self.probe => {
                Err(OvsdbError::ProbeTimeout(self.remote.clone()))
            }
            Some(_) => Ok(()),
            None if self.last_rx.elapsed() >= self.probe => {
                self.send(&json!({"method": "echo", "params": [], "id": "echo"}))?;
                self.stats.echoes_sent += 1;
                if let Some(c) = &self.echo_counter {
                    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.echo_sent = Some(Instant::now());
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn handle(&mut self, v: Value) -> Result<Option<Event>, OvsdbError> {
        let proto = |why: &str| OvsdbError::Protocol(self.remote.clone(), why.to_string());
        let Value::Object(mut m) = v else {
            return Err(proto("message is not an object"));
        };
        if let Some(method) = m.get("method").and_then(Value::as_str).map(str::to_string) {
            let params = m.remove("params").unwrap_or(Value::Null);
            let id = m.remove("id").unwrap_or(Value::Null);
            if method == "echo" {
                if !id.is_null() {
                    self.send(&json!({"result": params, "error": null, "id": id}))?;
                    self.stats.echoes_answered += 1;
                }
                return Ok(None);
            }
            if !id.is_null() {
                // A request we do not implement: say so, as RFC 7047 asks.
                self.send(&json!({"result": null, "error": "unknown method", "id": id}))?;
                return Ok(None);
            }
            return Ok(Some(Event::Notify(method, params)));
        }
        let id = m.remove("id").unwrap_or(Value::Null);
        if id == "echo" {
            // The reply to our probe; receiving it already reset the timer.
            return Ok(None);
        }
        let id = id
            .as_u64()
            .ok_or_else(|| proto("reply with an id we never sent"))?;
        let error = m.remove("error").unwrap_or(Value::Null);
        if !error.is_null() {
            return Ok(Some(Event::Reply(id, Err(error))));
        }
        Ok(Some(Event::Reply(
            id,
            Ok(m.remove("result").unwrap_or(Value::Null)),
        )))
    }

    /// `get_schema`.
    ///
    /// # Errors
    /// As [`Conn::call`], or a schema we cannot parse.
    pub fn get_schema(
        &mut self,
        db: &str,
        stop: &dyn Fn() -> bool,
    ) -> Result<datum::Schema, OvsdbError> {
        let v = self.call("get_schema", json!([db]), stop)?;
        datum::Schema::from_json(&v).map_err(|e| OvsdbError::Protocol(self.remote.clone(), e.0))
    }

    /// `transact`: run `ops` on `db` atomically. Returns the per-operation
    /// results.
    ///
    /// # Errors
    /// As [`Conn::call`]; [`OvsdbError::Transaction`] when an operation
    /// failed (the whole transaction was then aborted).
    pub fn transact(
        &mut self,
        db: &str,
        ops: Vec<Value>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<Value>, OvsdbError> {
        let mut params = vec![json!(db)];
        params.extend(ops);
        let v = self.call("transact", Value::Array(params), stop)?;
        let Value::Array(results) = v else {
            return Err(OvsdbError::Protocol(
                self.remote.clone(),
                "transact result is not an array".into(),
            ));
        };
        if let Some(e) = results
            .iter()
            .find(|r| r.get("error").is_some_and(|e| !e.is_null()))
        {
            return Err(OvsdbError::Transaction(e.clone()));
        }
        Ok(results)
    }
}

/// Read `Open_vSwitch.external_ids` from the local Open_vSwitch database:
/// the chassis name (`system-id`) and the OVN bridge (`ovn-bridge`,
/// default `br-int`), as the metadata agent does at start.
///
/// # Errors
/// Connection or transaction failures; no `system-id`.
pub fn read_local_chassis(
    remote: &Remote,
    opts: &ConnOptions,
) -> Result<(String, String), OvsdbError> {
    let mut conn = Conn::open(remote, opts)?;
    let never = || false;
    let res = conn.transact(
        "Open_vSwitch",
        vec![json!({"op": "select", "table": "Open_vSwitch", "where": [], "columns": ["external_ids"]})],
        &never,
    )?;
    let proto = |why: &str| OvsdbError::Protocol(remote.to_string(), why.to_string());
    let rows = res[0]["rows"]
        .as_array()
        .ok_or_else(|| proto("select without rows"))?;
    let row = rows.first().ok_or_else(|| proto("no Open_vSwitch row"))?;
    let t = datum::ColumnType::Map(datum::AtomType::String, datum::AtomType::String);
    let ids = datum::Datum::from_json(&t, &row["external_ids"]).map_err(|e| proto(&e.0))?;
    let system_id = ids
        .map_get("system-id")
        .and_then(datum::Atom::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| proto("Open_vSwitch external_ids:system-id is not set"))?
        .to_string();
    let bridge = ids
        .map_get("ovn-bridge")
        .and_then(datum::Atom::as_str)
        .unwrap_or("br-int")
        .to_string();
    Ok((system_id, bridge))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes() {
        assert_eq!(
            Remote::parse("tcp:10.0.0.1:6642").unwrap(),
            Remote::Tcp("10.0.0.1".into(), 6642)
        );
        assert_eq!(
            Remote::parse("ssl:[fd00::1]:6642").unwrap(),
            Remote::Ssl("fd00::1".into(), 6642)
        );
        assert_eq!(
            Remote::parse("unix:/run/ovn/ovnsb_db.sock").unwrap(),
            Remote::Unix("/run/ovn/ovnsb_db.sock".into())
        );
        assert_eq!(
            Remote::parse("ssl:[fd00::1]:6642").unwrap().to_string(),
            "ssl:[fd00::1]:6642"
        );
        for bad in [
            "tcp:host",
            "tcp::1",
            "udp:1.2.3.4:5",
            "ptcp:6642",
            "unix:",
            "tcp:h:99999",
            "",
        ] {
            assert!(Remote::parse(bad).is_err(), "{bad}");
        }
        let l = Remote::parse_list("tcp:a:1, tcp:b:2,ssl:c:3").unwrap();
        assert_eq!(l.len(), 3);
        assert!(Remote::parse_list(" , ").is_err());
    }
}

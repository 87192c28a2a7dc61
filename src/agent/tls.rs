//! HTTPS for the agent's clients (Neutron, Keystone): rustls over [`crate::rt::TcpConn`].
//!
//! rustls is IO-free: it takes ciphertext in (`read_tls`) and hands
//! ciphertext out (`write_tls`), so a TLS stream is a [`TcpConn`] plus a
//! `ClientConnection` pumped by hand with owned buffers, the same
//! `write_all` / `read_append` shape as a plain connection. Only the ring
//! provider is built (no aws-lc: it needs cmake and doubles the build).
//!
//! Trust: the CA bundle in `ca_file` if set, else the Mozilla roots compiled
//! in (webpki-roots: no dependency on the host's trust store layout);
//! `insecure = true` accepts any certificate (python-requests'
//! `verify=False`, which is what Neutron's `nova_metadata_insecure` does),
//! but still checks the handshake signatures.
//!
//! Invariant: no `RefCell` borrow of the connection is held across an
//! `.await`; every borrow is confined to a block that ends before the IO.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::rt::TcpConn;

/// Ciphertext read per socket read.
const TLS_READ_BYTES: usize = 16 * 1024;

/// Build a client config.
///
/// # Errors
/// `ca_file` cannot be read or holds no certificate.
pub fn client_config(insecure: bool, ca_file: Option<&Path>) -> io::Result<Arc<ClientConfig>> {
    client_config_with_cert(insecure, ca_file, None)
}

/// A client config that also presents a certificate (`nova_client_cert` /
/// `nova_client_priv_key`, PEM files) when `client_cert` is given.
///
/// # Errors
/// A file cannot be read or holds no usable certificate or key.
pub fn client_config_with_cert(
    insecure: bool,
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> io::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))?
                .collect::<Result<_, _>>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}")))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: no usable certificate", path.display()),
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = builder.with_root_certificates(roots);
    let mut cfg = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let bad = |p: &Path, e: String| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display()))
            };
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad(cert, e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad(cert, e.to_string()))?;
            if chain.is_empty() {
                return Err(bad(cert, "no certificate".into()));
            }
            let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                .map_err(|e| bad(key, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| bad(key, e.to_string()))?
        }
    };
    if insecure {
        cfg.dangerous()
            .set_certificate_verifier(Arc::new(AcceptAnyCert(provider)));
    }
    Ok(Arc::new(cfg))
}

/// `insecure = true`: any certificate, but real handshake signatures.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client stream over a [`TcpConn`].
pub struct TlsConn {
    tcp: TcpConn,
    tls: RefCell<ClientConnection>,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl TlsConn {
    /// Handshake over `tcp` for `name`.
    ///
    /// # Errors
    /// The handshake failed (certificate, protocol, IO).
    pub async fn connect(
        tcp: TcpConn,
        cfg: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<TlsConn> {
        let tls = ClientConnection::new(cfg, name).map_err(invalid)?;
        let conn = TlsConn {
            tcp,
            tls: RefCell::new(tls),
        };
        loop {
            conn.flush().await?;
            let (handshaking, wants_read) = {
                let t = conn.tls.borrow();
                (t.is_handshaking(), t.wants_read())
            };
            if !handshaking {
                break;
            }
            if wants_read && conn.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed during the TLS handshake",
                ));
            }
        }
        Ok(conn)
    }

    /// Write out whatever ciphertext rustls has queued.
    async fn flush(&self) -> io::Result<()> {
        loop {
            let out = {
                let mut t = self.tls.borrow_mut();
                if !t.wants_write() {
                    return Ok(());
                }
                let mut out = Vec::new();
                while t.wants_write() {
                    t.write_tls(&mut out)?;
                }
                out
            };
            let (r, _) = self.tcp.write_all(out).await;
            r?;
        }
    }

    /// Read ciphertext once and process it; 0 at EOF.
    async fn fill(&self) -> io::Result<usize> {
        let (r, buf) = self.tcp.read_append(Vec::new(), TLS_READ_BYTES).await;
        let n = r?;
        if n == 0 {
            return Ok(0);
        }
        let mut t = self.tls.borrow_mut();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            t.read_tls(&mut rd)?;
            t.process_new_packets().map_err(invalid)?;
        }
        Ok(n)
    }

    /// Encrypt and send all of `data`; the buffer comes back.
    pub async fn write_all(&self, data: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let r = self.tls.borrow_mut().writer().write_all(&data);
        if let Err(e) = r {
            return (Err(e), data);
        }
        (self.flush().await, data)
    }

    /// Append up to `max` plaintext bytes to `buf`; `Ok(0)` at EOF.
    pub async fn read_append(&self, mut buf: Vec<u8>, max: usize) -> (io::Result<usize>, Vec<u8>) {
        loop {
            let got = {
                let mut t = self.tls.borrow_mut();
                let start = buf.len();
                buf.resize(start + max, 0);
                let r = t.reader().read(&mut buf[start..]);
                buf.truncate(start + *r.as_ref().unwrap_or(&0));
                r
            };
            match got {
                Ok(n) => return (Ok(n), buf),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
            }
            match self.fill().await {
                Ok(0) => return (Ok(0), buf),
                Ok(_) => {}
                Err(e) => return (Err(e), buf),
            }
        }
    }

    /// What is waiting to be read now (see [`TcpConn::pending_input`]):
    /// `Bytes` when rustls holds decrypted data no read took. Ciphertext
    /// still on the socket may be a TLS record that carries no data (a
    /// session ticket, a key update), so it is reported as `Closed`: the
    /// connection is not reused, but what was read on it stands.
    pub fn pending_input(&self) -> crate::rt::PendingInput {
        use crate::rt::PendingInput;
        let buffered = self
            .tls
            .borrow_mut()
            .process_new_packets()
            .map_or(true, |s| s.plaintext_bytes_to_read() > 0);
        if buffered {
            return PendingInput::Bytes;
        }
        match self.tcp.pending_input() {
            PendingInput::Nothing => PendingInput::Nothing,
            PendingInput::Bytes | PendingInput::Closed => PendingInput::Closed,
        }
    }

    /// Shut the socket down (no close_notify: the connection is being dropped).
    pub fn shutdown(&self) {
        self.tcp.shutdown();
    }
}

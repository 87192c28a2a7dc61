//! The agent forwards to the metadata API over HTTPS (rustls), as Neutron's
//! `nova_metadata_protocol = https` does: verified with `auth_ca_cert`, or
//! not at all with `nova_metadata_insecure`, and presenting
//! `nova_client_cert` / `nova_client_priv_key` when the API demands one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const NET: &str = "4a0e0000-0000-4000-8000-0000000000a1";
const VM: &str = "4a0e0000-0000-4000-8000-000000000005";
const PROJECT: &str = "4a0e000000004000800000000000000a";

struct Pki {
    ca_pem: std::path::PathBuf,
    server: Arc<rustls::ServerConfig>,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// from the CA; `require_client` makes the server demand the client's.
fn pki(dir: &Path, require_client: bool) -> Pki {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&srv_key, &ca)
        .unwrap();
    let cli_key = rcgen::KeyPair::generate().unwrap();
    let cli = rcgen::CertificateParams::new(vec!["agent".to_string()])
        .unwrap()
        .signed_by(&cli_key, &ca)
        .unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let (client_cert, client_key) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&client_cert, cli.pem()).unwrap();
    std::fs::write(&client_key, cli_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(srv_key.serialize_der().into());
    let server = Arc::new(
        builder
            .with_single_cert(vec![srv.der().clone()], key)
            .unwrap(),
    );
    Pki {
        ca_pem,
        server,
        client_cert,
        client_key,
    }
}

/// A TLS metadata API answering `instance=<X-Instance-ID>`.
fn fake_api(server: Arc<rustls::ServerConfig>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            let server = server.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(tls) = rustls::ServerConnection::new(server) else {
                    return;
                };
                let mut s = rustls::StreamOwned::new(tls, conn);
                loop {
                    let mut r = BufReader::new(&mut s);
                    let mut id = String::new();
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("x-instance-id:") {
                            id = v.trim().to_string();
                        }
                    }
                    drop(r);
                    let body = format!("instance={id}");
                    let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    if s.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                    let _ = s.flush();
                }
            });
        }
    });
    addr
}

fn start_agent(
    dir: &Path,
    api: SocketAddr,
    nova_extra: &str,
) -> Result<metaproxy::agent::AgentHandle, String> {
    let inv = dir.join("inventory.toml");
    std::fs::write(
        &inv,
        format!(
            "[[network]]\nid = \"{NET}\"\nname = \"n\"\nproject = \"{PROJECT}\"\n[[network.subnet]]\nid = \"4a0e0000-0000-4000-8000-0000000000b1\"\ncidr = \"10.0.0.0/24\"\n\
             [[instance]]\nuuid = \"{VM}\"\nhostname = \"vm5\"\nproject = \"{PROJECT}\"\n[[instance.port]]\nid = \"4a0e0000-0000-4000-8000-0000000000e5\"\nnetwork = \"{NET}\"\nmac = \"fa:16:3e:00:00:05\"\nfixed_ips = [\"10.0.0.5\"]\n"
        ),
    )
    .unwrap();
    let text = format!(
        "[agent]\nsocket = \"{}\"\ninventory = \"{}\"\nmetadata_proxy_shared_secret = \"s\"\n[agent.nova]\nnova_metadata_host = \"127.0.0.1\"\nnova_metadata_port = {}\nnova_metadata_protocol = \"https\"\ntimeout = \"3s\"\n{nova_extra}\n",
        dir.join("agent.sock").display(),
        inv.display(),
        api.port()
    );
    let f = metaproxy::config::parse_str(&text, Path::new("t.toml")).unwrap();
    let cfg = metaproxy::agent::AgentConfig::try_from(f.agent.as_ref().unwrap())
        .map_err(|e| e.to_string())?;
    metaproxy::agent::start(cfg).map_err(|e| e.to_string())
}

fn ask(dir: &Path) -> (u16, String) {
    let mut s = UnixStream::connect(dir.join("agent.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.5\r\nX-Neutron-Network-ID: {NET}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn https_with_ca_insecure_and_client_certificates() {
    // Verified with auth_ca_cert.
    let d = tempfile::tempdir().unwrap();
    let p = pki(d.path(), false);
    let api = fake_api(p.server.clone());
    let h = start_agent(
        d.path(),
        api,
        &format!("auth_ca_cert = \"{}\"", p.ca_pem.display()),
    )
    .unwrap();
    assert_eq!(ask(d.path()), (200, format!("instance={VM}")));
    h.stop().unwrap();

    // No CA given: Mozilla roots do not know our test CA -> the API is unreachable (503).
    let d = tempfile::tempdir().unwrap();
    let h = start_agent(d.path(), api, "").unwrap();
    assert_eq!(ask(d.path()).0, 503);
    h.stop().unwrap();

    // Insecure: any certificate.
    let d = tempfile::tempdir().unwrap();
    let h = start_agent(d.path(), api, "nova_metadata_insecure = true").unwrap();
    assert_eq!(ask(d.path()), (200, format!("instance={VM}")));
    h.stop().unwrap();

    // An API demanding a client certificate: with one it works, without it does not.
    let d = tempfile::tempdir().unwrap();
    let p = pki(d.path(), true);
    let api = fake_api(p.server.clone());
    let with = format!(
        "auth_ca_cert = \"{}\"\nnova_client_cert = \"{}\"\nnova_client_priv_key = \"{}\"",
        p.ca_pem.display(),
        p.client_cert.display(),
        p.client_key.display()
    );
    let h = start_agent(d.path(), api, &with).unwrap();
    assert_eq!(ask(d.path()), (200, format!("instance={VM}")));
    h.stop().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let h = start_agent(
        d2.path(),
        api,
        &format!("auth_ca_cert = \"{}\"", p.ca_pem.display()),
    )
    .unwrap();
    assert_ne!(ask(d2.path()).0, 200, "no client certificate, no metadata");
    h.stop().unwrap();
}

#[test]
fn tls_options_are_validated_and_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let api: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let e = start_agent(d.path(), api, "nova_client_cert = \"/nonexistent.pem\"")
        .err()
        .unwrap();
    assert!(e.contains("agent.nova.nova_client_cert"), "{e}");
    let e = start_agent(d.path(), api, "auth_ca_cert = \"/nonexistent.pem\"")
        .err()
        .unwrap();
    assert!(e.contains("agent.nova.auth_ca_cert"), "{e}");
}

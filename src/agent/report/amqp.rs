//! The IO half of [`super`]: one thread, a current-thread tokio runtime,
//! and `lapin` talking AMQP 0-9-1 to the brokers. The Cargo feature
//! `amqp-report` (default); without it `no_amqp.rs` stands in and the
//! config refuses `[agent] transport_url` ([`crate::config::AMQP_REPORT`]).

use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{
    agent_state, envelope, message, utc_time, uuid4, AgentFacts, CallIds, ReportConfig,
    TransportUrl, AGENT_TYPE, CONNECT_TIMEOUT, EXCHANGE, MIN_CALL_TIMEOUT, REPLY_QUEUE_TTL_MS,
    RETRY_FIRST, RETRY_MAX, SHUTDOWN_WAIT, TOPIC,
};
use crate::log;

impl TransportUrl {
    /// The AMQP URI lapin connects to for host `i`.
    fn amqp_uri(&self, i: usize, tls: bool) -> lapin::uri::AMQPUri {
        let h = &self.hosts[i];
        lapin::uri::AMQPUri {
            scheme: if tls {
                lapin::uri::AMQPScheme::AMQPS
            } else {
                lapin::uri::AMQPScheme::AMQP
            },
            authority: lapin::uri::AMQPAuthority {
                userinfo: lapin::uri::AMQPUserInfo {
                    username: h.username.clone(),
                    password: h.password.clone(),
                },
                host: h.host.clone(),
                port: h.port,
            },
            vhost: self.vhost.clone(),
            query: lapin::uri::AMQPQueryString {
                connection_timeout: Some(CONNECT_TIMEOUT.as_millis() as u64),
                heartbeat: Some(60),
                ..Default::default()
            },
        }
    }
}

/// Why one connection's reporting ended.
#[derive(Debug, thiserror::Error)]
enum BrokerError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("neutron-server answered: {0}")]
    Failure(String),
}

/// The reporting thread; dropping it stops reporting.
pub struct Reporter {
    stop: Arc<tokio::sync::Notify>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reporter")
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start reporting on a thread of its own.
///
/// # Errors
/// The thread or its runtime could not be created.
pub fn start(cfg: ReportConfig, facts: AgentFacts) -> std::io::Result<Reporter> {
    let stop = Arc::new(tokio::sync::Notify::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    log::info(format_args!(
        "reporting state to {} as host {:?} every {:?} ({})",
        cfg.transport.redacted(),
        cfg.host,
        cfg.interval,
        if cfg.tls.is_some() { "TLS" } else { "plain" }
    ));
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name("agent-report".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    () = run(&cfg, &facts) => {}
                    () = s.notified() => {}
                }
            });
            // A name lookup on the blocking pool is not waited for.
            rt.shutdown_timeout(SHUTDOWN_WAIT);
        })?;
    Ok(Reporter {
        stop,
        thread: Some(thread),
    })
}

/// Reporting state across connections.
struct State {
    /// The next report is the first since start (a call, `start_flag`).
    first: bool,
    /// Set while reporting fails: logged once when set, once when cleared.
    outage: Option<std::time::Instant>,
}

async fn run(cfg: &ReportConfig, facts: &AgentFacts) {
    let mut st = State {
        first: true,
        outage: None,
    };
    let mut delay = RETRY_FIRST;
    let mut i = 0;
    loop {
        let host = &cfg.transport.hosts[i];
        let Err(e) = session(cfg, facts, i, &mut st, &mut delay).await;
        if st.outage.is_none() {
            st.outage = Some(std::time::Instant::now());
            log::warn(format_args!(
                "state reports to RabbitMQ {} failed: {e}; serving is not affected, \
                 retrying (across {} host(s)) and logging again when it works",
                host.redacted(),
                cfg.transport.hosts.len()
            ));
        } else {
            log::debug(format_args!("state report via {}: {e}", host.redacted()));
        }
        i = (i + 1) % cfg.transport.hosts.len();
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

async fn timed<T>(
    what: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(BrokerError::Timeout(what)),
    }
}

/// One connection to broker `i`: report every interval until it fails.
async fn session(
    cfg: &ReportConfig,
    facts: &AgentFacts,
    i: usize,
    st: &mut State,
    delay: &mut Duration,
) -> Result<std::convert::Infallible, BrokerError> {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};

    let uri = cfg.transport.amqp_uri(i, cfg.tls.is_some());
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: cfg
            .tls
            .as_ref()
            .and_then(|t| t.identity.clone())
            .map(|(pem, key)| lapin::tcp::OwnedIdentity::PKCS8 { pem, key }),
        cert_chain: cfg.tls.as_ref().and_then(|t| t.ca_pem.clone()),
    };
    let props = lapin::ConnectionProperties::default()
        .with_connection_name(format!("metaproxy-agent:{}", cfg.host).into());
    let conn = timed(
        "connecting",
        CONNECT_TIMEOUT,
        lapin::Connection::connect_uri_with_config(
            uri,
            props,
            tls,
            lapin::runtime::default_runtime()?,
        ),
    )
    .await?;
    let ch = timed("opening a channel", CONNECT_TIMEOUT, conn.create_channel()).await?;
    timed(
        "declaring the neutron exchange",
        CONNECT_TIMEOUT,
        ch.exchange_declare(
            EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    // The reply queue, as oslo's declare_direct_consumer: default exchange,
    // routing key = queue name, not durable, expiring when unused.
    let reply_q = format!("reply_{}", uuid4(true));
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongUInt(REPLY_QUEUE_TTL_MS));
    timed(
        "declaring the reply queue",
        CONNECT_TIMEOUT,
        ch.queue_declare(
            reply_q.as_str().into(),
            QueueDeclareOptions::default(),
            args,
        ),
    )
    .await?;
    let mut replies = timed(
        "consuming the reply queue",
        CONNECT_TIMEOUT,
        ch.basic_consume(
            reply_q.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(0);
    let call_timeout = cfg.interval.max(MIN_CALL_TIMEOUT);
    loop {
        let msg_id = uuid4(true);
        let call = st.first.then(|| CallIds {
            msg_id: &msg_id,
            reply_q: &reply_q,
        });
        let time = utc_time(SystemTime::now());
        let state = agent_state(&cfg.host, facts, st.first, &uuid4(false));
        let body = envelope(&message(
            state,
            &time,
            &uuid4(true),
            &format!("req-{}", uuid4(false)),
            call,
        ));
        timed(
            "publishing",
            CONNECT_TIMEOUT,
            ch.basic_publish(
                EXCHANGE.into(),
                TOPIC.into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            ),
        )
        .await?;
        if st.first {
            let answer = tokio::time::timeout(call_timeout, async {
                while let Some(d) = replies.next().await {
                    let d = d?;
                    if let Some(reply) = parse_reply(&d.data, &msg_id) {
                        return Ok(reply);
                    }
                }
                Err(BrokerError::Timeout(
                    "waiting for the reply (consumer ended)",
                ))
            })
            .await
            .map_err(|_| BrokerError::Timeout("waiting for neutron-server's reply"))??;
            match answer {
                Reply::Failure(f) => return Err(BrokerError::Failure(f)),
                Reply::Result(r) => log::info(format_args!(
                    "registered with neutron-server as {AGENT_TYPE:?} on host {:?}: {r}",
                    cfg.host
                )),
            }
            st.first = false;
        }
        if let Some(since) = st.outage.take() {
            log::info(format_args!(
                "state reports to RabbitMQ {} work again after {:?}",
                cfg.transport.hosts[i].redacted(),
                since.elapsed()
            ));
        }
        *delay = RETRY_FIRST;
        tokio::time::sleep(cfg.interval).await;
    }
}

/// A call's answer.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// `result` (`"new"`, `"alive"`, `"revived"`).
    Result(String),
    /// `failure`: the remote exception, serialized.
    Failure(String),
}

/// The final reply to `msg_id` in an enveloped reply body, if this is one.
fn parse_reply(body: &[u8], msg_id: &str) -> Option<Reply> {
    let outer: Value = serde_json::from_slice(body).ok()?;
    let inner: Value = match outer.get("oslo.message").and_then(Value::as_str) {
        Some(s) => serde_json::from_str(s).ok()?,
        None => outer,
    };
    if inner.get("_msg_id").and_then(Value::as_str) != Some(msg_id) {
        return None;
    }
    if inner.get("ending") == Some(&Value::Bool(false)) {
        return None;
    }
    match inner.get("failure") {
        Some(f) if !f.is_null() => Some(Reply::Failure(match f.as_str() {
            Some(s) => s.chars().take(300).collect(),
            None => f.to_string(),
        })),
        _ => Some(Reply::Result(match inner.get("result") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "null".into(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::report::RabbitTls;
    use serde_json::json;

    fn facts() -> AgentFacts {
        AgentFacts {
            socket: "/var/lib/neutron/metadata_proxy".into(),
            nova_host: "10.0.0.5".into(),
            nova_port: 8775,
        }
    }

    /// What a TLS broker and its clients need: a CA, the server's config
    /// (certificate for 127.0.0.1; `require_client`: demands one from the
    /// CA), the CA's PEM and a client certificate and key (PEM).
    struct Pki {
        server: Arc<rustls::ServerConfig>,
        ca_pem: String,
        client: (Vec<u8>, Vec<u8>),
    }

    fn pki(require_client: bool) -> Pki {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
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
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der().clone()).unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(srv_key.serialize_der().into());
        Pki {
            server: Arc::new(
                builder
                    .with_single_cert(vec![srv.der().clone()], key)
                    .unwrap(),
            ),
            ca_pem: ca.pem(),
            client: (cli.pem().into_bytes(), cli_key.serialize_pem().into_bytes()),
        }
    }

    /// A TLS listener on 127.0.0.1: sends the first 8 plaintext bytes of
    /// each connection whose handshake succeeded.
    fn tls_broker(
        server: Arc<rustls::ServerConfig>,
    ) -> (std::net::SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let conn = rustls::ServerConnection::new(server.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, c);
                let mut head = [0u8; 8];
                if tls.read_exact(&mut head).is_ok() && tx.send(head.to_vec()).is_err() {
                    return;
                }
            }
        });
        (addr, rx)
    }

    fn tls_config(addr: std::net::SocketAddr, tls: RabbitTls) -> ReportConfig {
        ReportConfig {
            transport: TransportUrl::parse(&format!("rabbit://u:p@{addr}/")).unwrap(),
            tls: Some(tls),
            host: "t".into(),
            interval: Duration::from_secs(1),
        }
    }

    /// `Some(first bytes)` if a session came up within `limit`.
    fn session_with(
        server: Arc<rustls::ServerConfig>,
        tls: RabbitTls,
        limit: Duration,
    ) -> Option<Vec<u8>> {
        let (addr, rx) = tls_broker(server);
        let r = start(tls_config(addr, tls), facts()).unwrap();
        let got = rx.recv_timeout(limit).ok();
        drop(r);
        got
    }

    #[test]
    fn tls_speaks_amqp_inside_a_verified_session() {
        let p = pki(false);
        let trusted = RabbitTls {
            ca_pem: Some(p.ca_pem.clone()),
            identity: None,
        };
        let head = session_with(p.server.clone(), trusted, Duration::from_secs(10));
        assert_eq!(head.as_deref(), Some(&b"AMQP\x00\x00\x09\x01"[..]));
        // Not signed by a trusted CA (the Mozilla roots): no session.
        let roots = RabbitTls {
            ca_pem: None,
            identity: None,
        };
        assert_eq!(session_with(p.server, roots, Duration::from_secs(2)), None);
    }

    #[test]
    fn tls_client_certificate() {
        let p = pki(true);
        let with = RabbitTls {
            ca_pem: Some(p.ca_pem.clone()),
            identity: Some(p.client.clone()),
        };
        let head = session_with(p.server.clone(), with, Duration::from_secs(10));
        assert_eq!(head.as_deref(), Some(&b"AMQP\x00\x00\x09\x01"[..]));
        let without = RabbitTls {
            ca_pem: Some(p.ca_pem.clone()),
            identity: None,
        };
        assert_eq!(
            session_with(p.server, without, Duration::from_secs(2)),
            None
        );
        let d = format!(
            "{:?}",
            RabbitTls {
                ca_pem: None,
                identity: Some(p.client)
            }
        );
        assert!(!d.contains("PRIVATE"), "{d}");
    }

    #[test]
    fn replies() {
        let wrap = |v: Value| envelope(&v);
        let ok = wrap(json!({"result": "new", "failure": null, "ending": true, "_msg_id": "m"}));
        assert_eq!(parse_reply(&ok, "m"), Some(Reply::Result("new".into())));
        assert_eq!(parse_reply(&ok, "other"), None);
        let hb = wrap(json!({"result": null, "failure": null, "ending": false, "_msg_id": "m"}));
        assert_eq!(parse_reply(&hb, "m"), None);
        let bad = wrap(json!({"result": null, "failure": "NoSuchMethod", "_msg_id": "m"}));
        assert_eq!(
            parse_reply(&bad, "m"),
            Some(Reply::Failure("NoSuchMethod".into()))
        );
    }
}

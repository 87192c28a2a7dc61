//! IMDSv2 session tokens and rate limiting at the proxy, end to end over TCP.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn start(agent: &FakeAgent, extra: &str) -> (metaproxy::proxy::ProxyHandle, SocketAddr) {
    let h = metaproxy::proxy::start(proxy_config(&agent.path, extra)).unwrap();
    let addr = h.bound[0][0];
    (h, addr)
}

fn put_token(addr: SocketAddr, path: &str, extra: &str) -> Resp {
    get(
        addr,
        &format!("PUT {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}\r\n"),
    )
    .unwrap()
}

fn with_token(addr: SocketAddr, token: &str) -> Resp {
    get(
        addr,
        &format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"),
    )
    .unwrap()
}

#[test]
fn token_matrix_matches_aws_and_firecracker() {
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let (h, addr) = start(&agent, "");
    // Issue.
    let r = put_token(
        addr,
        "/latest/api/token",
        "X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("X-aws-ec2-metadata-token-ttl-seconds"),
        Some("21600")
    );
    let token = r.text();
    assert!(!token.is_empty());
    // Negative PUTs, with their exact statuses.
    let cases = [
        ("/latest/api/token", "", 400),
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 0\r\n",
            400,
        ),
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 21601\r\n",
            400,
        ),
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: soon\r\n",
            400,
        ),
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 10.0.0.1\r\n",
            400,
        ),
        // Any header saying the PUT was forwarded, like X-Forwarded-For.
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 60\r\nForwarded: for=10.0.0.1\r\n",
            400,
        ),
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Real-IP: 10.0.0.1\r\n",
            400,
        ),
        // The TTL is decimal digits only.
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: +5\r\n",
            400,
        ),
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 0x5\r\n",
            400,
        ),
        (
            "/latest/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 5 5\r\n",
            400,
        ),
        (
            "/2021-03-23/api/token",
            "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n",
            403,
        ),
    ];
    for (path, hdrs, want) in cases {
        assert_eq!(
            put_token(addr, path, hdrs).status,
            want,
            "PUT {path} {hdrs:?}"
        );
    }
    // Use: valid → relayed without any token header; invalid → 401; none → v1 (optional mode).
    assert_eq!(with_token(addr, &token).status, 200);
    assert_eq!(
        with_token(addr, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").status,
        401
    );
    assert_eq!(
        get(addr, "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .status,
        200
    );
    let seen = agent.seen();
    assert_eq!(
        seen.len(),
        2,
        "token PUTs and rejected requests never reach the agent"
    );
    for s in &seen {
        assert!(
            s.all("X-aws-ec2-metadata-token").is_empty(),
            "token header stripped"
        );
        assert!(s.all("X-aws-ec2-metadata-token-ttl-seconds").is_empty());
    }
    h.stop().unwrap();
}

#[test]
fn required_mode_demands_a_token_and_tokens_expire() {
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let (h, addr) = start(
        &agent,
        "[proxy.imdsv2]\nmode = \"required\"\nhop_limit = 2\n[proxy.limits]",
    );
    assert_eq!(
        get(addr, "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .status,
        401
    );
    let token = put_token(
        addr,
        "/latest/api/token",
        "X-aws-ec2-metadata-token-ttl-seconds: 1\r\n",
    )
    .text();
    assert_eq!(with_token(addr, &token).status, 200);
    // The TTL running out is the behaviour under test.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(with_token(addr, &token).status, 401, "expired");
    h.stop().unwrap();
}

#[test]
fn a_token_from_another_vm_is_rejected() {
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let text = format!(
        "[proxy]\nagent_socket = \"{}\"\n[[proxy.namespace]]\nrouter_id = \"{ROUTER}\"\nlisten = \"127.0.0.1:0\"\n",
        agent.path.display()
    );
    let f = metaproxy::proxy::config::parse_str(&text, std::path::Path::new("t.toml")).unwrap();
    let h = metaproxy::proxy::start(
        metaproxy::proxy::config::ProxyConfig::try_from(f.proxy.as_ref().unwrap()).unwrap(),
    )
    .unwrap();
    let addr = h.bound[0][0];
    // VM A = 127.0.0.1, VM B = 127.0.0.2 (distinct loopback sources).
    let token = put_token(
        addr,
        "/latest/api/token",
        "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n",
    )
    .text();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut s: std::net::TcpStream = sock.into();
    use std::io::Write;
    s.write_all(format!("GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n").as_bytes())
        .unwrap();
    let r = read_response(&mut std::io::BufReader::new(s), false).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(with_token(addr, &token).status, 200, "still valid for VM A");
    h.stop().unwrap();
}

#[test]
fn rate_limit_answers_429_before_the_agent() {
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let (h, addr) = start(
        &agent,
        "[proxy.rate_limit]\nenabled = true\nbase_window = \"10s\"\nbase_limit = 5\nburst_window = \"10s\"\nburst_limit = 5\n[proxy.limits]",
    );
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            get(addr, "GET /openstack HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap()
                .status
        })
        .collect();
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(agent.seen().len(), 5);
    h.stop().unwrap();
}

#[test]
fn a_token_is_rejected_in_another_namespace() {
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let text = format!(
        "[proxy]\nagent_socket = \"{}\"\n[[proxy.namespace]]\nrouter_id = \"{ROUTER}\"\nlisten = \"127.0.0.1:0\"\n\
         [[proxy.namespace]]\nnetwork_id = \"7a7a7a7a-0000-4000-8000-000000000002\"\nlisten = \"127.0.0.1:0\"\n",
        agent.path.display()
    );
    let f = metaproxy::proxy::config::parse_str(&text, std::path::Path::new("t.toml")).unwrap();
    let h = metaproxy::proxy::start(
        metaproxy::proxy::config::ProxyConfig::try_from(f.proxy.as_ref().unwrap()).unwrap(),
    )
    .unwrap();
    let (a, b) = (h.bound[0][0], h.bound[1][0]);
    let token = put_token(
        a,
        "/latest/api/token",
        "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n",
    )
    .text();
    assert_eq!(with_token(a, &token).status, 200);
    assert_eq!(
        with_token(b, &token).status,
        401,
        "same client, other namespace"
    );
    h.stop().unwrap();
}

//! Spoofing suite, end to end through `metaproxy up` (proxy → agent → API):
//! the attacker VM (127.0.0.2) sends every trust header with the victim's
//! (127.0.0.1) values, in every spelling the parser might let through, and
//! must get either its own metadata or an error, never the victim's.
//!
//! Each case is (raw request, exact status, owner of the data). The whole
//! byte stream the attacker gets back is read until close and checked for
//! the victim's uuid, hostname, key and user-data, not just the first
//! response. One `up` serves the whole file; the cases run one after
//! another on fresh connections.

mod common;

use common::attack::{
    assert_baseline, check_one, exchange, responses, start_up, victim_signature, Owner,
    ATTACKER_IP, META, NETWORK_ID, PROJECT, ROUTER_ID, VICTIM_IP, VICTIM_UUID,
};

/// One attack: the raw bytes, the exact status, whose data a 200 carries.
struct Case {
    name: String,
    raw: Vec<u8>,
    status: u16,
    owner: Owner,
}

fn case(name: impl Into<String>, raw: impl Into<Vec<u8>>, status: u16, owner: Owner) -> Case {
    Case {
        name: name.into(),
        raw: raw.into(),
        status,
        owner,
    }
}

/// Every header the proxy must treat as its own statement, with the value
/// that would make the request the victim's if it were believed.
fn trust_headers() -> Vec<(&'static str, String)> {
    vec![
        ("X-Forwarded-For", VICTIM_IP.to_string()),
        ("Forwarded", format!("for={VICTIM_IP}")),
        ("X-Real-IP", VICTIM_IP.to_string()),
        ("X-Neutron-Router-ID", ROUTER_ID.to_string()),
        ("X-Neutron-Network-ID", NETWORK_ID.to_string()),
        ("X-OVN-Network-ID", NETWORK_ID.to_string()),
        ("X-Instance-ID", VICTIM_UUID.to_string()),
        // A genuinely valid signature for the victim: the strongest forgery.
        ("X-Instance-ID-Signature", victim_signature()),
        ("X-Tenant-ID", PROJECT.to_string()),
    ]
}

fn mixed_case(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect()
}

/// The name as a WSGI server would file it too (PEP 3333: `-` and `_` both
/// become `_` in `HTTP_*`).
fn underscored(name: &str) -> String {
    name.replace('-', "_")
}

fn spellings(name: &str) -> [(&'static str, String); 4] {
    [
        ("lower", name.to_ascii_lowercase()),
        ("UPPER", name.to_ascii_uppercase()),
        ("MiXeD", mixed_case(name)),
        ("under_scored", underscored(&mixed_case(name))),
    ]
}

/// A GET for the metadata document with `lines` (each already terminated)
/// between Host and Connection: close, every line ending in `eol`.
fn get_with(lines: &str, eol: &str) -> Vec<u8> {
    format!("GET {META} HTTP/1.1{eol}Host: 169.254.169.254{eol}{lines}Connection: close{eol}{eol}")
        .into_bytes()
}

fn crlf(lines: &str) -> Vec<u8> {
    get_with(lines, "\r\n")
}

fn table() -> Vec<Case> {
    use Owner::{Attacker, None};
    let mut t = Vec::new();
    let headers = trust_headers();
    for (name, value) in &headers {
        for (spelling, n) in spellings(name) {
            let id = format!("{name} {spelling}");
            // Honoured by nobody: stripped, then the proxy's own identity is stamped.
            t.push(case(
                format!("{id}: plain"),
                crlf(&format!("{n}: {value}\r\n")),
                200,
                Attacker,
            ));
            t.push(case(
                format!("{id}: duplicated"),
                crlf(&format!(
                    "{n}: {value}\r\n{n}: {value}\r\n{name}: {value}\r\n"
                )),
                200,
                Attacker,
            ));
            t.push(case(
                format!("{id}: empty value"),
                crlf(&format!("{n}:\r\n")),
                200,
                Attacker,
            ));
            t.push(case(
                format!("{id}: blank value then victim value"),
                crlf(&format!("{n}:   \r\n{n}: {value}\r\n")),
                200,
                Attacker,
            ));
            t.push(case(
                format!("{id}: LF-only line endings"),
                get_with(&format!("{n}: {value}\n{n}: {value}\n"), "\n"),
                200,
                Attacker,
            ));
            t.push(case(
                format!("{id}: one LF-only line among CRLF"),
                crlf(&format!("X-Pad: 1\n{n}: {value}\n")),
                200,
                Attacker,
            ));
            t.push(case(
                format!("{id}: tabs and spaces around the value"),
                crlf(&format!("{n}:\t {value} \t\r\n")),
                200,
                Attacker,
            ));
            t.push(case(
                format!("{id}: no space after the colon"),
                crlf(&format!("{n}:{value}\r\n")),
                200,
                Attacker,
            ));
            // obs-fold (RFC 9112 §5.2): a server MUST either reject it or
            // unfold it; unfolding would glue the trust header back together
            // after the rewrite decided what it was, so 400.
            t.push(case(
                format!("{id}: obs-folded onto a harmless header"),
                crlf(&format!("X-Pad: 1\r\n {n}: {value}\r\n")),
                400,
                None,
            ));
            t.push(case(
                format!("{id}: obs-folded value"),
                crlf(&format!("{n}: 0\r\n\t{value}\r\n")),
                400,
                None,
            ));
            // Whitespace between name and colon: RFC 9112 §5.1 says MUST 400
            // (a lenient peer would read a different field name).
            t.push(case(
                format!("{id}: space before the colon"),
                crlf(&format!("{n} : {value}\r\n")),
                400,
                None,
            ));
            t.push(case(
                format!("{id}: tab before the colon"),
                crlf(&format!("{n}\t: {value}\r\n")),
                400,
                None,
            ));
        }
        // The victim's value presented as an IMDSv2 token (the proxy runs the
        // default `optional` mode): a token that does not verify for this
        // client is 401, like AWS, not "ignored and served".
        for token_header in ["X-aws-ec2-metadata-token", "X-METADATA-TOKEN"] {
            t.push(case(
                format!("{name} value as {token_header}"),
                crlf(&format!("{token_header}: {value}\r\n")),
                401,
                None,
            ));
        }
    }

    // All of them at once, in every spelling.
    for spelling in 0..4 {
        let lines: String = headers
            .iter()
            .map(|(name, value)| format!("{}: {value}\r\n", spellings(name)[spelling].1))
            .collect();
        t.push(case(
            format!("all trust headers {}", spellings("x")[spelling].0),
            crlf(&lines),
            200,
            Attacker,
        ));
    }

    // Address lists and alternative address spellings: whichever element a
    // lenient parser might pick, the proxy replaces the whole field.
    for (name, value) in [
        ("X-Forwarded-For", "127.0.0.1, 127.0.0.2"),
        ("X-Forwarded-For", "127.0.0.2, 127.0.0.1"),
        ("X-Forwarded-For", "127.0.0.1,127.0.0.1"),
        ("X-Forwarded-For", "::ffff:127.0.0.1"),
        ("X-Forwarded-For", "[::ffff:127.0.0.1]"),
        ("X-Forwarded-For", "::ffff:7f00:1"),
        ("X-Forwarded-For", "0:0:0:0:0:ffff:127.0.0.1"),
        ("X-Forwarded-For", "127.0.0.1:80"),
        ("X-Forwarded-For", "2130706433"),
        ("X-Forwarded-For", "127.1"),
        ("X-Real-IP", "::ffff:127.0.0.1"),
        ("Forwarded", "for=\"[::ffff:127.0.0.1]\""),
        ("Forwarded", "for=127.0.0.1;by=127.0.0.1, for=127.0.0.2"),
        ("Forwarded", "for=127.0.0.2, for=127.0.0.1"),
    ] {
        t.push(case(
            format!("{name}: {value}"),
            crlf(&format!("{name}: {value}\r\n")),
            200,
            Attacker,
        ));
    }

    // Client-address headers other proxies honour, and the Host itself: not
    // trust headers here (they pass through), and nothing behind the proxy
    // reads them, so they change nothing.
    for (name, value) in [
        ("X-Client-IP", VICTIM_IP),
        ("Client-IP", VICTIM_IP),
        ("True-Client-IP", VICTIM_IP),
        ("X-Cluster-Client-IP", VICTIM_IP),
        ("X-Original-Forwarded-For", VICTIM_IP),
        ("X-Forwarded-Host", "127.0.0.1"),
        ("Via", "1.1 127.0.0.1"),
        ("X-Metadata-Provider", ROUTER_ID),
        ("X-Metadata-Provider-Signature", "00"),
    ] {
        t.push(case(
            format!("{name}: {value}"),
            crlf(&format!("{name}: {value}\r\n")),
            200,
            Attacker,
        ));
    }
    for host in ["127.0.0.1", "127.0.0.1:80", "demo", "[::ffff:127.0.0.1]"] {
        t.push(case(
            format!("Host: {host}"),
            format!("GET {META} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            200,
            Attacker,
        ));
    }
    // Query strings naming the victim select nothing.
    for query in [
        format!("?uuid={VICTIM_UUID}"),
        format!("?instance_id={VICTIM_UUID}&ip={VICTIM_IP}"),
        "?X-Forwarded-For=127.0.0.1".to_string(),
    ] {
        t.push(case(
            format!("query {query}"),
            format!("GET {META}{query} HTTP/1.1\r\nConnection: close\r\n\r\n"),
            200,
            Attacker,
        ));
    }
    t
}

#[test]
fn trust_headers_never_make_the_attacker_the_victim() {
    let up = start_up();
    assert_baseline(&up);
    let cases = table();
    assert!(cases.len() > 400, "{}", cases.len());
    for c in &cases {
        let bytes = exchange(ATTACKER_IP, up.proxy, &c.raw);
        check_one(&bytes, c.status, c.owner, &c.name);
    }
}

/// Tokens are bound to the client address: the victim's own valid token,
/// presented by the attacker together with every trust header, is a 401.
/// The attacker's own token with the same headers serves the attacker.
#[test]
fn imdsv2_tokens_do_not_transfer_between_vms() {
    let up = start_up();
    let put = b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n";
    let token_of = |ip: &str| {
        let r = responses(&exchange(ip, up.proxy, put));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, 200, "{}", r[0].text());
        r[0].text()
    };
    let victim_token = token_of(VICTIM_IP);
    let attacker_token = token_of(ATTACKER_IP);
    assert_ne!(victim_token, attacker_token);

    let spoof: String = trust_headers()
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let with_victim = crlf(&format!(
        "{spoof}X-aws-ec2-metadata-token: {victim_token}\r\n"
    ));
    check_one(
        &exchange(ATTACKER_IP, up.proxy, &with_victim),
        401,
        Owner::None,
        "victim's token from the attacker",
    );
    let with_own = crlf(&format!(
        "{spoof}X-aws-ec2-metadata-token: {attacker_token}\r\n"
    ));
    check_one(
        &exchange(ATTACKER_IP, up.proxy, &with_own),
        200,
        Owner::Attacker,
        "attacker's own token with spoofed headers",
    );
    // Two tokens (one valid for the attacker, one the victim's): ambiguous, 401.
    let both = crlf(&format!(
        "X-aws-ec2-metadata-token: {attacker_token}\r\nX-aws-ec2-metadata-token: {victim_token}\r\n"
    ));
    check_one(
        &exchange(ATTACKER_IP, up.proxy, &both),
        401,
        Owner::None,
        "two tokens",
    );
    // A token PUT carrying X-Forwarded-For is refused (AWS does the same:
    // the request went through a forwarding hop, so the token could end up
    // somewhere other than the VM).
    let put_xff = format!(
        "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: {VICTIM_IP}\r\nConnection: close\r\n\r\n"
    );
    check_one(
        &exchange(ATTACKER_IP, up.proxy, put_xff.as_bytes()),
        400,
        Owner::None,
        "token PUT with X-Forwarded-For",
    );
}

/// What reaches the agent: with every trust header in every spelling
/// (underscores included, which WSGI agents read as the dashed name), the
/// proxy forwards exactly one `X-Forwarded-For` (the peer) and one router id,
/// and no other header that a WSGI server would file under a trust header's
/// `HTTP_*` key. Checked at the agent because metaproxy's own agent ignores
/// the underscore spellings, so the end-to-end cases above cannot see them.
#[test]
fn no_spelling_of_a_trust_header_reaches_the_agent() {
    use common::{get, proxy_config, AgentMode, FakeAgent, ROUTER};
    let agent = FakeAgent::start(AgentMode::KeepAlive);
    let h = metaproxy::proxy::start(proxy_config(&agent.path, "")).unwrap();
    let addr = h.bound[0][0];
    let mut lines = String::new();
    for (name, value) in trust_headers() {
        for (_, n) in spellings(name) {
            lines.push_str(&format!("{n}: {value}\r\n"));
        }
        // Partly underscored.
        lines.push_str(&format!("{}: {value}\r\n", name.replacen('-', "_", 1)));
    }
    let raw = format!("GET {META} HTTP/1.1\r\nHost: x\r\n{lines}Connection: close\r\n\r\n");
    let r = get(addr, &raw).unwrap();
    assert_eq!(r.status, 200);
    let seen = agent.seen();
    assert_eq!(seen.len(), 1);
    let wsgi = |n: &str| n.to_ascii_uppercase().replace('-', "_");
    for (name, _) in trust_headers() {
        let got: Vec<&(String, String)> = seen[0]
            .headers
            .iter()
            .filter(|(n, _)| wsgi(n) == wsgi(name))
            .collect();
        match name {
            "X-Forwarded-For" => assert_eq!(
                got,
                vec![&("X-Forwarded-For".to_string(), "127.0.0.1".to_string())]
            ),
            "X-Neutron-Router-ID" => assert_eq!(
                got,
                vec![&("X-Neutron-Router-ID".to_string(), ROUTER.to_string())]
            ),
            _ => assert!(got.is_empty(), "{name} reached the agent as {got:?}"),
        }
    }
    h.stop().unwrap();
}

/// The write side: the attacker POSTs a password while claiming to be the
/// victim. It lands on the attacker's own instance (Nova's set-once rule
/// then answers 409 to a second POST), the victim's password is untouched,
/// and the attacker can never read the victim's back.
#[test]
fn password_writes_and_reads_stay_with_their_vm() {
    let up = start_up();
    let path = "/openstack/2013-04-04/password";
    let post = |ip: &str, body: &str, extra: &str| {
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        responses(&exchange(ip, up.proxy, raw.as_bytes()))
    };
    let read = |ip: &str, extra: &str| {
        let raw = format!("GET {path} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n");
        exchange(ip, up.proxy, raw.as_bytes())
    };
    let victim_pw = "victim-password-Zq81";
    let r = post(VICTIM_IP, victim_pw, "");
    assert_eq!(r[0].status, 200, "{}", r[0].text());

    let spoof: String = trust_headers()
        .iter()
        .flat_map(|(n, v)| {
            [
                format!("{n}: {v}\r\n"),
                format!("{}: {v}\r\n", underscored(n)),
            ]
        })
        .collect();
    // The attacker's reads, spoofed or not, never show the victim's password.
    for extra in ["", spoof.as_str()] {
        let bytes = read(ATTACKER_IP, extra);
        assert!(
            !String::from_utf8_lossy(&bytes).contains(victim_pw),
            "victim's password leaked"
        );
        common::attack::assert_no_victim_data(&bytes, "password read");
        assert_eq!(responses(&bytes)[0].status, 200);
    }
    // The spoofed write goes to the attacker's instance...
    let r = post(ATTACKER_IP, "attacker-pw", &spoof);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, 200, "{}", r[0].text());
    let mine = responses(&read(ATTACKER_IP, ""));
    assert_eq!(mine[0].text(), "attacker-pw");
    // ...and the victim's password is the one it set.
    let theirs = responses(&read(VICTIM_IP, ""));
    assert_eq!(theirs[0].text(), victim_pw);
    // A second spoofed POST is the attacker's own second POST: Nova's 409.
    let r = post(ATTACKER_IP, "again", &spoof);
    assert_eq!(r[0].status, 409, "{}", r[0].text());
    assert_eq!(responses(&read(VICTIM_IP, ""))[0].text(), victim_pw);
}

/// The spoofed head delivered a few bytes at a time (every read boundary
/// the parser might mishandle), and pipelined many times on one connection:
/// every answer is the attacker's own.
#[test]
fn spoofed_heads_split_across_reads_and_pipelined() {
    use std::io::Write;
    let up = start_up();
    let spoof: String = trust_headers()
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let one = format!("GET {META} HTTP/1.1\r\nHost: 169.254.169.254\r\n{spoof}\r\n");
    for piece in [1, 2, 3, 7, 64] {
        let mut s = common::attack::connect_from(ATTACKER_IP, up.proxy);
        s.set_nodelay(true).unwrap();
        let raw = format!("{one}{one}GET {META} HTTP/1.1\r\n{spoof}Connection: close\r\n\r\n");
        for part in raw.as_bytes().chunks(piece) {
            s.write_all(part).unwrap();
            // A slow client on purpose: each piece arrives in its own read.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let bytes = common::attack::read_all(&mut s);
        common::attack::assert_no_victim_data(&bytes, "split");
        let r = responses(&bytes);
        assert_eq!(r.len(), 3, "pieces of {piece}");
        for resp in &r {
            assert_eq!(resp.status, 200);
            common::attack::assert_owner(resp, Owner::Attacker, "split");
        }
    }
    // 200 pipelined in one write.
    let raw = format!(
        "{}GET {META} HTTP/1.1\r\n{spoof}Connection: close\r\n\r\n",
        one.repeat(199)
    );
    let bytes = exchange(ATTACKER_IP, up.proxy, raw.as_bytes());
    common::attack::assert_no_victim_data(&bytes, "pipelined");
    let r = responses(&bytes);
    assert_eq!(r.len(), 200);
    for resp in &r {
        assert_eq!(resp.status, 200);
        common::attack::assert_owner(resp, Owner::Attacker, "pipelined");
    }
}

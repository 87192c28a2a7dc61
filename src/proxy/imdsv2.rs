//! IMDSv2 session tokens, answered by the proxy itself.
//!
//! `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..=21600`
//! returns a token; later requests carry it in `X-aws-ec2-metadata-token`.
//! Tokens are stateless, like Firecracker's: the token is
//! `base64url(expiry_ms ‖ HMAC-SHA256(key, ns_id ‖ client_ip ‖ expiry_ms)[..16])`
//! with a per-process random key, so nothing is stored per token, a token
//! from VM A fails for VM B or in another namespace, and a restart
//! invalidates every token (clients re-PUT on 401). Expiry is on the
//! monotonic clock, so wall-clock jumps do not matter. An HMAC was chosen over
//! an AEAD because nothing in the token is secret; it only has to be unforgeable.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::http::write::write_answer_with;
use crate::http::{HeaderName, HeaderValue};

/// Headers that mark a request as forwarded by a proxy; a token PUT
/// carrying any of them is refused with 400 (AWS refuses `X-Forwarded-For`;
/// `Forwarded` and `X-Real-IP` say the same thing).
pub const FORWARDING_HEADERS: &[&str] = &["x-forwarded-for", "forwarded", "x-real-ip"];
/// Largest TTL AWS accepts.
pub const MAX_TTL_SECS: u64 = 21_600;
/// Path of the token endpoint.
pub const TOKEN_PATH: &[u8] = b"/latest/api/token";
/// The token headers live beside the other headers the proxy never forwards.
pub use crate::http::{is_token_header, TOKEN_HEADERS, TTL_HEADERS};
/// Longest token we bother decoding (ours are 32 characters).
const MAX_TOKEN_CHARS: usize = 70;
const TAG_BYTES: usize = 16;

/// `[proxy.imdsv2] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No token endpoint; token headers are stripped and ignored.
    Off,
    /// Tokens issued and checked when presented; requests without one are served (IMDSv1).
    Optional,
    /// Every request but the token PUT needs a valid token.
    Required,
}

/// What the proxy should do with a request, as far as tokens go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Relay it (token headers are stripped by the caller).
    Relay,
    /// Answer with this status and close.
    Reject(u16),
    /// Answer 200 with this token (and echo the TTL).
    Issue { token: String, ttl: u64 },
}

/// Issues and checks tokens; one per process, shared by every loop.
pub struct TokenAuthority {
    key: [u8; 32],
    epoch: Instant,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenAuthority { key: <redacted> }")
    }
}

impl TokenAuthority {
    /// A fresh random key.
    ///
    /// # Errors
    /// The OS random source failed.
    pub fn new() -> std::io::Result<TokenAuthority> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(TokenAuthority {
            key,
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn tag(&self, ns_id: &str, client: IpAddr, expiry_ms: u64) -> [u8; TAG_BYTES] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(ns_id.as_bytes());
        mac.update(&[0]);
        match client {
            IpAddr::V4(a) => mac.update(&a.octets()),
            IpAddr::V6(a) => mac.update(&a.octets()),
        }
        mac.update(&expiry_ms.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; TAG_BYTES];
        t.copy_from_slice(&full[..TAG_BYTES]);
        t
    }

    /// A token for `client` in namespace `ns_id`, valid for `ttl`.
    pub fn issue(&self, ns_id: &str, client: IpAddr, ttl: Duration, now: Instant) -> String {
        let expiry = self
            .now_ms(now)
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut raw = [0u8; 8 + TAG_BYTES];
        raw[..8].copy_from_slice(&expiry.to_be_bytes());
        raw[8..].copy_from_slice(&self.tag(ns_id, client, expiry));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Whether `token` was issued by this process for `client` in `ns_id` and has not expired.
    pub fn validate(&self, ns_id: &str, client: IpAddr, token: &[u8], now: Instant) -> bool {
        let token = trim(token);
        if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
            return false;
        }
        let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token) else {
            return false;
        };
        if raw.len() != 8 + TAG_BYTES {
            return false;
        }
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&raw[..8]);
        let expiry = u64::from_be_bytes(exp);
        let want = self.tag(ns_id, client, expiry);
        let mut diff = 0u8;
        for (a, b) in want.iter().zip(&raw[8..]) {
            diff |= a ^ b;
        }
        diff == 0 && expiry > self.now_ms(now)
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// The request's facts that matter for tokens.
pub struct TokenRequest<'a> {
    /// Method is PUT.
    pub is_put: bool,
    /// Path without query.
    pub path: &'a [u8],
    /// `X-Forwarded-For`, `Forwarded` or `X-Real-IP` was present: the PUT
    /// came through (or pretends to come through) a proxy, and a token must
    /// not leave the instance ([`FORWARDING_HEADERS`]).
    pub has_forwarded_for: bool,
    /// Every TTL header value.
    pub ttl: &'a [&'a [u8]],
    /// Every token header value.
    pub tokens: &'a [&'a [u8]],
}

/// The `X-aws-ec2-metadata-token-ttl-seconds` answer header.
const TTL_ANSWER: HeaderName<'static> =
    HeaderName::from_static("X-aws-ec2-metadata-token-ttl-seconds");

/// The 200 answer to a token PUT, written with [`crate::http::write`]:
/// `Content-Type: text/plain`, the TTL echoed, the token as the body (left
/// out after a HEAD), `Connection: close` when `close`.
pub fn write_token_answer(out: &mut Vec<u8>, token: &str, ttl: u64, is_head: bool, close: bool) {
    let ttl = ttl.to_string();
    // Digits only: always a valid value.
    let extra = HeaderValue::new(ttl.as_bytes())
        .ok()
        .map(|v| (TTL_ANSWER, v));
    write_answer_with(
        out,
        200,
        HeaderValue::from_static("text/plain"),
        extra.as_slice(),
        token.as_bytes(),
        is_head,
        close,
    );
}

/// Decide what to do with a request under `mode`.
pub fn decide(
    mode: Mode,
    auth: &TokenAuthority,
    ns_id: &str,
    client: IpAddr,
    req: &TokenRequest<'_>,
    now: Instant,
) -> Verdict {
    if mode == Mode::Off {
        return Verdict::Relay;
    }
    if req.is_put && is_token_path(req.path) {
        if req.has_forwarded_for {
            return Verdict::Reject(400);
        }
        // Decimal digits only: `u64::from_str` would also take `+5`, and
        // trimming here would take ` 5` (HTTP already strips the OWS around
        // a field value).
        let ttl = match req.ttl {
            [one] if !one.is_empty() && one.iter().all(u8::is_ascii_digit) => {
                std::str::from_utf8(one)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
            }
            _ => None,
        };
        return match ttl {
            Some(t) if (1..=MAX_TTL_SECS).contains(&t) => Verdict::Issue {
                token: auth.issue(ns_id, client, Duration::from_secs(t), now),
                ttl: t,
            },
            _ => Verdict::Reject(400),
        };
    }
    if req.is_put && is_versioned_token_path(req.path) {
        return Verdict::Reject(403);
    }
    match req.tokens {
        [] if mode == Mode::Required => Verdict::Reject(401),
        [] => Verdict::Relay,
        [one] if auth.validate(ns_id, client, one, now) => Verdict::Relay,
        _ => Verdict::Reject(401),
    }
}

fn is_token_path(path: &[u8]) -> bool {
    path == TOKEN_PATH || path.strip_suffix(b"/") == Some(TOKEN_PATH)
}

/// `/<version>/api/token` for any version other than `latest`.
fn is_versioned_token_path(path: &[u8]) -> bool {
    let p = path.strip_suffix(b"/").unwrap_or(path);
    match p
        .strip_prefix(b"/")
        .and_then(|r| r.strip_suffix(b"/api/token"))
    {
        Some(ver) => !ver.is_empty() && !ver.contains(&b'/') && ver != b"latest",
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_token_answer_has_the_ttl_the_token_and_no_body_after_head() {
        let mut out = Vec::new();
        write_token_answer(&mut out, "tok", 21600, false, false);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
              X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 3\r\n\r\ntok"
        );
        let mut head = Vec::new();
        write_token_answer(&mut head, "tok", 5, true, true);
        assert_eq!(
            head,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
              X-aws-ec2-metadata-token-ttl-seconds: 5\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
    }

    use super::*;

    const NS: &str = "6e1f3b0c-9d6a-4f0e-8b7a-2c1d0e9f8a7b";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn put<'a>(path: &'a [u8], ttl: &'a [&'a [u8]], xff: bool) -> TokenRequest<'a> {
        TokenRequest {
            is_put: true,
            path,
            has_forwarded_for: xff,
            ttl,
            tokens: &[],
        }
    }

    #[test]
    fn token_is_bound_to_client_namespace_and_expiry() {
        let a = TokenAuthority::new().unwrap();
        let now = Instant::now();
        let t = a.issue(NS, ip("10.0.0.5"), Duration::from_secs(2), now);
        assert!(t.len() <= MAX_TOKEN_CHARS);
        assert!(a.validate(NS, ip("10.0.0.5"), t.as_bytes(), now));
        assert!(
            !a.validate(NS, ip("10.0.0.6"), t.as_bytes(), now),
            "other VM"
        );
        assert!(
            !a.validate("other-ns", ip("10.0.0.5"), t.as_bytes(), now),
            "other namespace"
        );
        assert!(
            !a.validate(
                NS,
                ip("10.0.0.5"),
                t.as_bytes(),
                now + Duration::from_secs(2)
            ),
            "expired"
        );
        let other = TokenAuthority::new().unwrap();
        assert!(
            !other.validate(NS, ip("10.0.0.5"), t.as_bytes(), now),
            "other process key"
        );
        // Tampering with any byte fails.
        let mut raw = t.clone().into_bytes();
        for i in 0..raw.len() {
            let orig = raw[i];
            raw[i] = if orig == b'A' { b'B' } else { b'A' };
            assert!(
                !a.validate(NS, ip("10.0.0.5"), &raw, now),
                "flipped byte {i}"
            );
            raw[i] = orig;
        }
        assert!(!a.validate(NS, ip("10.0.0.5"), b"", now));
        assert!(!a.validate(NS, ip("10.0.0.5"), &[b'A'; 200], now));
        assert!(!a.validate(NS, ip("10.0.0.5"), b"!!!not base64!!!", now));
    }

    #[test]
    fn firecracker_and_aws_cases() {
        let a = TokenAuthority::new().unwrap();
        let now = Instant::now();
        let c = ip("10.0.0.5");
        let d = |m, r: &TokenRequest<'_>| decide(m, &a, NS, c, r, now);
        let ok = d(
            Mode::Optional,
            &put(b"/latest/api/token", &[b"21600"], false),
        );
        assert!(matches!(ok, Verdict::Issue { ttl: 21600, .. }));
        assert!(matches!(
            d(Mode::Required, &put(b"/latest/api/token", &[b"1"], false)),
            Verdict::Issue { ttl: 1, .. }
        ));
        // Decimal digits only (the HTTP parser already dropped the OWS).
        for bad in [
            &b"0"[..],
            b"21601",
            b"-1",
            b"abc",
            b"",
            b"1.5",
            b"+5",
            b" 5",
            b"5 ",
            b"\t5",
            b"0x5",
            b"99999999999999999999999",
        ] {
            assert_eq!(
                d(Mode::Optional, &put(b"/latest/api/token", &[bad], false)),
                Verdict::Reject(400),
                "{bad:?}"
            );
        }
        assert_eq!(
            d(Mode::Optional, &put(b"/latest/api/token", &[], false)),
            Verdict::Reject(400),
            "missing TTL"
        );
        assert_eq!(
            d(
                Mode::Optional,
                &put(b"/latest/api/token", &[b"5", b"6"], false)
            ),
            Verdict::Reject(400)
        );
        assert_eq!(
            d(Mode::Optional, &put(b"/latest/api/token", &[b"60"], true)),
            Verdict::Reject(400),
            "XFF"
        );
        assert_eq!(
            d(
                Mode::Optional,
                &put(b"/2021-03-23/api/token", &[b"60"], false)
            ),
            Verdict::Reject(403)
        );
        assert_eq!(
            d(Mode::Off, &put(b"/latest/api/token", &[b"60"], false)),
            Verdict::Relay
        );

        let Verdict::Issue { token, .. } = ok else {
            unreachable!()
        };
        fn get<'a>(tokens: &'a [&'a [u8]]) -> TokenRequest<'a> {
            TokenRequest {
                is_put: false,
                path: b"/latest/meta-data/",
                has_forwarded_for: false,
                ttl: &[],
                tokens,
            }
        }
        let with = [token.as_bytes()];
        assert_eq!(
            decide(Mode::Optional, &a, NS, c, &get(&[]), now),
            Verdict::Relay,
            "v1 in optional"
        );
        assert_eq!(
            decide(Mode::Required, &a, NS, c, &get(&[]), now),
            Verdict::Reject(401)
        );
        assert_eq!(
            decide(Mode::Required, &a, NS, c, &get(&with), now),
            Verdict::Relay
        );
        assert_eq!(
            decide(Mode::Optional, &a, NS, c, &get(&[b"bogus"]), now),
            Verdict::Reject(401)
        );
        assert_eq!(
            decide(Mode::Optional, &a, NS, ip("10.0.0.6"), &get(&with), now),
            Verdict::Reject(401)
        );
        assert_eq!(
            decide(
                Mode::Optional,
                &a,
                NS,
                c,
                &get(&with),
                now + Duration::from_secs(21_601)
            ),
            Verdict::Reject(401),
            "expired"
        );
    }

    #[test]
    fn token_headers_are_recognised_in_any_case() {
        assert!(is_token_header(b"X-AWS-EC2-METADATA-TOKEN"));
        assert!(is_token_header(b"x-metadata-token-ttl-seconds"));
        // The WSGI spelling of the same header is the same header behind Nova.
        assert!(is_token_header(b"X_aws_ec2_metadata_token"));
        assert!(is_token_header(b"x_metadata_token_ttl_seconds"));
        assert!(!is_token_header(b"x_metadata_token2"));
        assert!(!is_token_header(b"x-forwarded-for"));
    }
}

//! The doctor's IO: listening sockets of a namespace, a command run inside
//! one, and one HTTP exchange with timeouts. Blocking std IO on the doctor's
//! own short-lived process, never on a serving loop.
//!
//! Listeners are read from `/proc/thread-self/net/tcp{,6}` by a thread that
//! has entered the namespace ([`crate::rt::netns::in_namespace`]), rather
//! than by connecting: a connect needs a route to the address (`lo` may be
//! down in a router namespace) and would show up in the proxy's counters.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::forward::ApiResponse;
use crate::http::{frame_response, Limits};

/// Largest answer read from any peer.
pub const MAX_ANSWER_BYTES: u64 = 4 * 1024 * 1024;
/// How long a command run inside a namespace (`iptables-save`, `nft`) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP sockets in LISTEN state in the network namespace at `netns`.
///
/// # Errors
/// The namespace cannot be entered, or `/proc` cannot be read.
pub fn listening(netns: Option<&Path>) -> io::Result<Vec<SocketAddr>> {
    crate::rt::netns::in_namespace(netns, || {
        let mut out = Vec::new();
        for file in ["tcp", "tcp6"] {
            // thread-self: /proc/self/net is the namespace of the main thread.
            let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))?;
            out.extend(parse_proc_net_tcp(&text));
        }
        Ok(out)
    })
}

/// The LISTEN sockets of a `/proc/net/tcp` or `tcp6` table.
pub fn parse_proc_net_tcp(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = match addr.len() {
                // The kernel prints each 32-bit word in host byte order.
                8 => IpAddr::V4(Ipv4Addr::from(
                    u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
                )),
                32 => {
                    let mut bytes = [0u8; 16];
                    for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                        let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                        chunk.copy_from_slice(&word.to_ne_bytes());
                    }
                    IpAddr::V6(Ipv6Addr::from(bytes))
                }
                _ => return None,
            };
            Some(SocketAddr::new(ip, port))
        })
        .collect()
}

/// Whether a listener for `want` is among `bound`: the address itself, or a
/// wildcard on its port (for a wildcard `want`, either family's wildcard:
/// the proxy falls back from `[::]` to `0.0.0.0` when IPv6 is off).
pub fn is_bound(want: SocketAddr, bound: &[SocketAddr]) -> bool {
    bound.iter().any(|b| {
        b.port() == want.port()
            && (b.ip() == want.ip()
                || b.ip().is_unspecified()
                    && (b.is_ipv6() || want.is_ipv4() || want.ip().is_unspecified()))
    })
}

/// Neutron's `metadata_access_mark`: the mark its mangle rule puts on
/// redirected metadata traffic, which the INPUT rule lets through.
pub const METADATA_ACCESS_MARK: u32 = 0x1;

/// Connect to `addr` (from the calling thread's namespace) with timeouts on
/// every IO, the socket carrying [`METADATA_ACCESS_MARK`] so that a router's
/// INPUT rule treats it as redirected metadata traffic (setting the mark
/// needs CAP_NET_ADMIN; without it the connect is tried unmarked).
///
/// # Errors
/// The connect failed or timed out.
pub fn connect_marked(addr: SocketAddr, timeout: Duration) -> io::Result<std::net::TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    let _ = s.set_mark(METADATA_ACCESS_MARK);
    s.connect_timeout(&addr.into(), timeout)?;
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Run `program args` inside the namespace at `netns`, with a timeout:
/// `Ok(None)` when the program is not installed.
///
/// # Errors
/// The namespace cannot be entered, the program failed or timed out.
pub fn run_in(netns: Option<&Path>, program: &str, args: &[&str]) -> io::Result<Option<String>> {
    crate::rt::netns::in_namespace(netns, || {
        // The child is forked from this thread, so it starts in the namespace.
        let mut child = match Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let t0 = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if t0.elapsed() > COMMAND_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{program} did not finish within {COMMAND_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{program} {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    })
}

/// Send `req` on `stream` and read one response (the peer may close after
/// it). The stream must have its read and write timeouts set.
///
/// # Errors
/// IO errors, a timeout, or an answer that is not HTTP.
pub fn exchange<S: Read + Write>(
    stream: &mut S,
    req: &[u8],
    is_head: bool,
) -> Result<ApiResponse, String> {
    stream.write_all(req).map_err(|e| format!("sending: {e}"))?;
    let limits = Limits::default();
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    // The socket's timeout bounds each read; this bounds the whole answer
    // (a peer trickling bytes, or reads interrupted again and again).
    let t0 = Instant::now();
    loop {
        if t0.elapsed() > super::CHECK_TIMEOUT {
            return Err("no whole answer in time".to_string());
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            // A signal (the event loop's helper threads) is no answer: read again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err("no answer in time".to_string())
            }
            Err(e) => return Err(format!("reading: {e}")),
        };
        buf.extend_from_slice(&chunk[..n]);
        match frame_response(&buf, &limits, is_head, MAX_ANSWER_BYTES, n == 0)? {
            Some((len, head)) => {
                buf.truncate(len);
                return Ok(ApiResponse { bytes: buf, head });
            }
            None if n == 0 => {
                return Err(if buf.is_empty() {
                    "closed without answering".into()
                } else {
                    "closed mid-answer".into()
                })
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_listeners() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: FEA9FEA9:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert_eq!(
            parse_proc_net_tcp(v4),
            vec!["169.254.169.254:80".parse::<SocketAddr>().unwrap()]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000000000000:25D1 00000000000000000000000000000000:0000 0A 0\n\
   1: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(
            parse_proc_net_tcp(v6),
            vec![
                "[::]:9681".parse::<SocketAddr>().unwrap(),
                "[::1]:22".parse().unwrap()
            ]
        );
    }

    #[test]
    fn wildcards_cover_their_port() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_bound(a("[::]:9697"), &[a("0.0.0.0:9697")]));
        assert!(is_bound(a("169.254.169.254:80"), &[a("0.0.0.0:80")]));
        assert!(is_bound(a("169.254.169.254:80"), &[a("[::]:80")]));
        assert!(!is_bound(a("169.254.169.254:80"), &[a("10.0.0.1:80")]));
        assert!(!is_bound(a("[fe80::a9fe:a9fe]:80"), &[a("0.0.0.0:80")]));
        assert!(!is_bound(a("[::]:9697"), &[a("[::]:9698")]));
    }
}

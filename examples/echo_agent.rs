//! A minimal stand-in for the metadata agent, for benchmarks: listens on a
//! Unix socket and answers every request with a fixed 200 (keep-alive and
//! pipelining supported; `Connection: close` honoured). One thread per
//! connection, std only, so its cost never lands on the proxy being measured.
//!
//! Usage: `cargo run --release --example echo_agent -- /tmp/agent.sock`

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;

const BODY: &str = r#"{"uuid": "d0d0d0d0-0000-4000-8000-000000000001", "hostname": "demo.novalocal", "name": "demo"}"#;

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/metaproxy/agent.sock".into());
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(&path)?;
    eprintln!("echo_agent listening on {path}");
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut w = conn.try_clone().expect("clone");
            let mut r = BufReader::with_capacity(16 * 1024, conn);
            loop {
                let mut close = false;
                let mut len = 0usize;
                let mut first = true;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        if first {
                            continue;
                        }
                        break;
                    }
                    first = false;
                    let lower = l.to_ascii_lowercase();
                    if lower.starts_with("connection:") && lower.contains("close") {
                        close = true;
                    }
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{BODY}",
                    BODY.len(),
                    if close { "Connection: close\r\n" } else { "" }
                );
                if w.write_all(resp.as_bytes()).is_err() || close {
                    return;
                }
            }
        });
    }
    Ok(())
}

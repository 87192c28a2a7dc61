//! The physical floor for benchmarks (issue 13): a minimal HTTP responder on
//! the proxy's own runtime seam ([`metaproxy::rt`]: the same compio io_uring
//! loops, ring flags, buffer ring and pinning), doing only accept, read, write
//! and close. It answers every request with the same fixed 200 that
//! `examples/echo_agent.rs` gives the proxy, so "proxy + echo agent" and
//! "responder" hand the client identical bytes and the difference in CPU per
//! request is what the proxy's work costs on top of the kernel's and the
//! runtime's.
//!
//! Keep-alive and pipelining are supported (one answer per whole request
//! head; requests have no body); `Connection: close` and HTTP/1.0 without
//! keep-alive are honoured. Nothing else is parsed: this is a measuring stick,
//! not a server.
//!
//! Usage: `cargo run --release --example uring_responder -- 127.0.0.1:18699 [loops=1] [body_bytes]`
//!
//! With `body_bytes` the body is that many bytes (the echo agent's JSON,
//! padded with spaces), so that `scripts/bench-hops.sh` can hand the agent
//! an answer the size of the API's.

use std::net::SocketAddr;

use metaproxy::rt;

/// The echo agent's body (94 bytes).
const BODY: &str = r#"{"uuid": "d0d0d0d0-0000-4000-8000-000000000001", "hostname": "demo.novalocal", "name": "demo"}"#;

/// The answer, keep-alive and closing, built once at start-up.
static ANSWERS: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();

fn answers(body_bytes: usize) -> (Vec<u8>, Vec<u8>) {
    let body = format!("{BODY:<body_bytes$}");
    let head = |extra: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    (head(""), head("Connection: close\r\n"))
}

/// Whether the request head asks to close after its answer.
fn wants_close(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let http10 = text
        .split("\r\n")
        .next()
        .is_some_and(|l| l.ends_with("http/1.0"));
    let close = text.contains("\r\nconnection: close");
    let keep = text.contains("\r\nconnection: keep-alive");
    close || (http10 && !keep)
}

async fn serve(conn: rt::TcpConn) {
    let mut buf: Vec<u8> = Vec::new();
    let (answer, answer_close) = ANSWERS.get_or_init(|| answers(BODY.len()));
    let mut out: Vec<u8> = Vec::with_capacity(answer_close.len());
    loop {
        let (res, b) = if buf.is_empty() {
            conn.read_idle(Vec::new(), 4096).await
        } else {
            conn.read_append(buf, 4096).await
        };
        buf = b;
        match res {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        out.clear();
        let mut close = false;
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            close = wants_close(&buf[..end]);
            out.extend_from_slice(if close { answer_close } else { answer });
            buf.drain(..end + 4);
            if close {
                break;
            }
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        if !out.is_empty() {
            let (res, o) = conn.write_all(std::mem::take(&mut out)).await;
            out = o;
            if res.is_err() {
                return;
            }
        }
        if close {
            return;
        }
        if buf.is_empty() {
            buf = Vec::new(); // idle: hold no buffer, as the proxy does
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18699".into())
        .parse()
        .map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("listen address: {e}"),
            )
        })?;
    let loops: usize = args.next().map_or(Ok(1), |s| s.parse()).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("loops: {e}"))
    })?;
    let body_bytes: usize = args
        .next()
        .map_or(Ok(BODY.len()), |s| s.parse())
        .map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("body_bytes: {e}"))
        })?;
    let _ = ANSWERS.set(answers(body_bytes));
    let std_listener = std::sync::Arc::new(rt::listen_tcp(addr, 4096)?);
    eprintln!("uring_responder listening on {addr}, {loops} loop(s)");
    let handles = rt::run_loops(loops, "responder", move |_| {
        let l = std_listener.try_clone();
        async move {
            let acceptor = rt::TcpAcceptor::from_std(l?)?;
            loop {
                match acceptor.accept().await {
                    Ok((conn, _)) => rt::spawn(serve(conn)),
                    Err(e) => eprintln!("accept: {e}"),
                }
            }
        }
    })?;
    for h in handles {
        match h.join() {
            Ok(r) => r?,
            Err(_) => return Err(std::io::Error::other("a loop panicked")),
        }
    }
    Ok(())
}

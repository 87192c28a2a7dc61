//! The physical floor of a pooled hop (issue 13): the least an agent can do
//! for a request that arrives on an already-open pooled Unix connection and
//! leaves on an already-open pooled keep-alive TCP connection, on the
//! proxy's own runtime seam ([`metaproxy::rt`]: the same compio io_uring
//! loop, ring flags and buffer ring as our daemons).
//!
//! For each accepted Unix connection it opens one TCP connection to the
//! upstream, once, and then only copies bytes: whatever one read from the
//! Unix side returns (a batch of pipelined requests) goes out in one write
//! to the TCP side, and whatever one read from the TCP side returns (a batch
//! of answers) goes back in one write. That is two reads and two writes per
//! batch, no parse, no header rewrite, no signature, no lookup, no task or
//! timer per request: what the kernel and the runtime charge for one pooled
//! hop, and nothing of ours. `scripts/bench-hops.sh` runs it against the
//! agent in the same run.
//!
//! Usage: `cargo run --release --example hop_relay -- SOCKET_PATH UPSTREAM_ADDR [loops=1]`

use std::net::SocketAddr;
use std::rc::Rc;

use metaproxy::rt;

/// Copy everything `from` sends to `to`, one write per read, until either
/// side ends. The buffer is reused (no allocation per batch).
async fn copy<R, W>(from: Rc<R>, to: Rc<W>)
where
    R: Reader,
    W: Writer,
{
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        buf.clear();
        let (res, b) = from.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let (res, b) = to.write(buf).await;
        buf = b;
        if res.is_err() {
            break;
        }
    }
    from.end();
    to.end();
}

/// The two stream types share one shape; these traits let one `copy` serve
/// both directions.
trait Reader {
    async fn read(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>);
    fn end(&self);
}
trait Writer {
    async fn write(&self, buf: Vec<u8>) -> (std::io::Result<()>, Vec<u8>);
    fn end(&self);
}
macro_rules! io_traits {
    ($t:ty) => {
        impl Reader for $t {
            async fn read(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
                self.read_append(buf, 16 * 1024).await
            }
            fn end(&self) {
                self.shutdown();
            }
        }
        impl Writer for $t {
            async fn write(&self, buf: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
                self.write_all(buf).await
            }
            fn end(&self) {
                self.shutdown();
            }
        }
    };
}
io_traits!(rt::UnixConn);
io_traits!(rt::TcpConn);

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "/tmp/metaproxy/relay.sock".into());
    let upstream: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18699".into())
        .parse()
        .map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("upstream: {e}"))
        })?;
    let loops: usize = args.next().map_or(Ok(1), |s| s.parse()).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("loops: {e}"))
    })?;
    let _ = std::fs::remove_file(&path);
    let std_listener =
        std::sync::Arc::new(rt::listen_unix(std::path::Path::new(&path), 4096, 0o666)?);
    eprintln!("hop_relay listening on {path}, upstream {upstream}, {loops} loop(s)");
    let handles = rt::run_loops(loops, "relay", move |_| {
        let l = std_listener.try_clone();
        async move {
            let acceptor = rt::UnixAcceptor::from_std(l?)?;
            loop {
                let down = match acceptor.accept().await {
                    Ok(c) => Rc::new(c),
                    Err(e) => {
                        eprintln!("accept: {e}");
                        continue;
                    }
                };
                let up = match rt::TcpConn::connect(upstream, None).await {
                    Ok(c) => Rc::new(c),
                    Err(e) => {
                        eprintln!("connect {upstream}: {e}");
                        continue;
                    }
                };
                rt::spawn(copy(down.clone(), up.clone()));
                rt::spawn(copy(up, down));
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

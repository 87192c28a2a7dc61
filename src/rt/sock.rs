//! Sockets: listeners we create ourselves (socket2) and owned-buffer streams.
//!
//! Listeners are made with socket2 so that the backlog (compio's own `bind`
//! uses 128, which overflows in a boot storm), `SO_REUSEADDR`, `IPV6_V6ONLY`
//! and the namespace they live in are under our control; they are handed to
//! compio afterwards. Streams expose one idle-friendly read: while a
//! connection has no partial request buffered it waits with a *provided*
//! buffer from the loop's buffer ring instead of owning one, so 10 000 idle
//! keep-alive connections do not pin 10 000 buffers. If the ring is empty
//! (ENOBUFS) the read falls back to an owned buffer.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use compio::buf::BufResult;
use compio::io::{AsyncReadExt, AsyncReadManaged, AsyncWriteExt};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// How long [`listen_tcp_retrying`] retries a bind that fails with
/// EADDRINUSE. After a crash (SIGKILL) the kernel tears the dead process's
/// io_uring down asynchronously, and its in-flight accept keeps the old
/// listener bound for tens of milliseconds (measured 7-23 ms here), long
/// enough for a quick restart to fail. A real conflict still fails, one
/// second later.
pub const BIND_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(1);
/// Pause between those bind attempts.
pub const BIND_RETRY_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// [`listen_tcp`], retrying EADDRINUSE for [`BIND_RETRY_FOR`].
///
/// # Errors
/// As [`listen_tcp`]; EADDRINUSE only once it has lasted [`BIND_RETRY_FOR`].
pub fn listen_tcp_retrying(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let give_up = std::time::Instant::now() + BIND_RETRY_FOR;
    loop {
        match listen_tcp(addr, backlog) {
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < give_up =>
            {
                std::thread::sleep(BIND_RETRY_EVERY);
            }
            r => return r,
        }
    }
}

/// Create a TCP listener bound to `addr` in the calling thread's network
/// namespace. IPv6 wildcard listeners are dual-stack.
///
/// # Errors
/// Socket creation, bind (e.g. address not present yet, port in use) or listen failed.
pub fn listen_tcp(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_cloexec(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt here instead of one per connection.
    sock.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        // `[::]:9697` serves v4 clients too, as Neutron's `bind :::9697` does.
        sock.set_only_v6(false)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Create a Unix listener at `path` with the given backlog and mode.
///
/// # Errors
/// Bind or listen failed (the caller handles stale files).
pub fn listen_unix(
    path: &Path,
    backlog: i32,
    mode: u32,
) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    sock.set_cloexec(true)?;
    sock.bind(&socket2::SockAddr::unix(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Stop a listening socket now, for every fd that shares it (the loops'
/// dups included): pending accepts fail with EINVAL and the port can be bound
/// again at once, instead of whenever the kernel finishes tearing down the
/// io_uring requests that still reference the socket.
pub fn shutdown_listener(l: &std::net::TcpListener) {
    let _ = SockRef::from(l).shutdown(std::net::Shutdown::Read);
}

/// The peer's IP, with an IPv4-mapped IPv6 address turned into IPv4.
pub fn peer_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Set the IP TTL (v4) or unicast hop limit (v6) of a connected socket.
///
/// # Errors
/// The socket option could not be set.
pub fn set_ip_ttl(conn: &TcpConn, ttl: u32) -> io::Result<()> {
    let sref = SockRef::from(conn);
    match sref.local_addr()?.as_socket() {
        Some(SocketAddr::V6(_)) => {
            // A dual-stack socket carrying v4 traffic uses IP_TTL; set both.
            let _ = sref.set_ttl_v4(ttl);
            sref.set_unicast_hops_v6(ttl)
        }
        _ => sref.set_ttl_v4(ttl),
    }
}

/// What [`TcpConn::pending_input`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingInput {
    /// Nothing to read: the peer is quiet.
    Nothing,
    /// Bytes are waiting.
    Bytes,
    /// The peer closed (or the socket failed).
    Closed,
}

macro_rules! stream_impl {
    ($name:ident, $inner:ty) => {
        /// An owned-buffer stream on the current loop.
        pub struct $name {
            inner: $inner,
        }

        impl $name {
            /// Append what the peer sent to `buf` (at most its spare capacity,
            /// growing it to `min_spare` first). `Ok(0)` is end of stream.
            pub async fn read_append(
                &self,
                mut buf: Vec<u8>,
                min_spare: usize,
            ) -> (io::Result<usize>, Vec<u8>) {
                if buf.capacity() - buf.len() < min_spare {
                    buf.reserve(min_spare);
                }
                let mut s = &self.inner;
                let BufResult(res, buf) = s.append(buf).await;
                (res, buf)
            }

            /// Wait for data while holding no buffer of our own: the kernel picks a
            /// provided buffer from the loop's ring; its bytes are appended to `buf`
            /// (which should be empty and capacity-less while idle) and the ring
            /// buffer goes straight back. Falls back to an owned read when the ring
            /// is exhausted.
            pub async fn read_idle(
                &self,
                mut buf: Vec<u8>,
                fallback_spare: usize,
            ) -> (io::Result<usize>, Vec<u8>) {
                let mut s = &self.inner;
                match s.read_managed(0).await {
                    Ok(Some(pooled)) => {
                        let n = pooled.len();
                        buf.extend_from_slice(&pooled);
                        (Ok(n), buf)
                    }
                    Ok(None) => (Ok(0), buf),
                    // An empty ring: compio reports ENOBUFS as ResourceBusy
                    // ("buffer ring has no available buffer"). The storm found it:
                    // without this, idle connections were closed unanswered under load.
                    Err(e)
                        if e.raw_os_error() == Some(libc::ENOBUFS)
                            || e.kind() == io::ErrorKind::ResourceBusy
                            || e.kind() == io::ErrorKind::Unsupported =>
                    {
                        self.read_append(buf, fallback_spare).await
                    }
                    Err(e) => (Err(e), buf),
                }
            }

            /// Write all of `buf[..]`; the buffer comes back for reuse.
            pub async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
                let mut s = &self.inner;
                let BufResult(res, buf) = s.write_all(buf).await;
                (res, buf)
            }

            /// Write a static byte string (canned responses).
            pub async fn write_static(&self, bytes: &'static [u8]) -> io::Result<()> {
                let mut s = &self.inner;
                let BufResult(res, _) = s.write_all(bytes).await;
                res
            }

            /// `shutdown(2)` both directions: ends any IO still queued on the
            /// socket, so a timed-out connection frees its fd and buffers now.
            pub fn shutdown(&self) {
                let _ = SockRef::from(self).shutdown(std::net::Shutdown::Both);
            }

            /// Half-close our sending side (after a final response).
            pub fn shutdown_write(&self) {
                let _ = SockRef::from(self).shutdown(std::net::Shutdown::Write);
            }

            /// What is waiting to be read right now, without reading it or
            /// waiting (`MSG_PEEK | MSG_DONTWAIT`): a pooled client asks this
            /// before reusing an idle connection and after reading a response.
            pub fn pending_input(&self) -> PendingInput {
                let mut one = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                match SockRef::from(self)
                    .recv_with_flags(&mut one, libc::MSG_PEEK | libc::MSG_DONTWAIT)
                {
                    Ok(0) => PendingInput::Closed,
                    Ok(_) => PendingInput::Bytes,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => PendingInput::Nothing,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => PendingInput::Nothing,
                    Err(_) => PendingInput::Closed,
                }
            }
        }

        impl AsFd for $name {
            fn as_fd(&self) -> BorrowedFd<'_> {
                self.inner.as_fd()
            }
        }

        impl AsRawFd for $name {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                self.inner.as_raw_fd()
            }
        }
    };
}

stream_impl!(TcpConn, compio::net::TcpStream);
stream_impl!(UnixConn, compio::net::UnixStream);

/// What server code needs from a connection, whatever its family (the proxy
/// and the API serve TCP, the agent a Unix socket).
pub trait Stream {
    /// See [`TcpConn::read_idle`].
    fn read_idle(
        &self,
        buf: Vec<u8>,
        fallback_spare: usize,
    ) -> impl std::future::Future<Output = (io::Result<usize>, Vec<u8>)>;
    /// See [`TcpConn::read_append`].
    fn read_append(
        &self,
        buf: Vec<u8>,
        min_spare: usize,
    ) -> impl std::future::Future<Output = (io::Result<usize>, Vec<u8>)>;
    /// See [`TcpConn::write_static`].
    fn write_static(
        &self,
        bytes: &'static [u8],
    ) -> impl std::future::Future<Output = io::Result<()>>;
    /// See [`TcpConn::write_all`].
    fn write_all(
        &self,
        buf: Vec<u8>,
    ) -> impl std::future::Future<Output = (io::Result<()>, Vec<u8>)>;
    /// See [`TcpConn::shutdown_write`].
    fn shutdown_write(&self);
    /// See [`TcpConn::shutdown`].
    fn shutdown(&self);
}

macro_rules! stream_trait {
    ($name:ident) => {
        impl Stream for $name {
            fn read_idle(
                &self,
                buf: Vec<u8>,
                fallback_spare: usize,
            ) -> impl std::future::Future<Output = (io::Result<usize>, Vec<u8>)> {
                $name::read_idle(self, buf, fallback_spare)
            }
            fn read_append(
                &self,
                buf: Vec<u8>,
                min_spare: usize,
            ) -> impl std::future::Future<Output = (io::Result<usize>, Vec<u8>)> {
                $name::read_append(self, buf, min_spare)
            }
            fn write_static(
                &self,
                bytes: &'static [u8],
            ) -> impl std::future::Future<Output = io::Result<()>> {
                $name::write_static(self, bytes)
            }
            fn write_all(
                &self,
                buf: Vec<u8>,
            ) -> impl std::future::Future<Output = (io::Result<()>, Vec<u8>)> {
                $name::write_all(self, buf)
            }
            fn shutdown_write(&self) {
                $name::shutdown_write(self)
            }
            fn shutdown(&self) {
                $name::shutdown(self)
            }
        }
    };
}

stream_trait!(TcpConn);
stream_trait!(UnixConn);

impl UnixConn {
    /// Connect to a Unix socket path.
    ///
    /// # Errors
    /// The socket is missing or refused the connection.
    pub async fn connect(path: &Path) -> io::Result<UnixConn> {
        Ok(UnixConn {
            inner: compio::net::UnixStream::connect(path).await?,
        })
    }
}

impl TcpConn {
    /// Connect to `addr`, optionally from a fixed local source address.
    ///
    /// # Errors
    /// Bind or connect failed.
    pub async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpConn> {
        let inner = match source {
            None => compio::net::TcpStream::connect(addr).await?,
            Some(ip) => {
                let sock =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                sock.set_cloexec(true)?;
                sock.set_reuse_address(true)?;
                sock.bind(&SocketAddr::new(ip, 0).into())?;
                let std_stream: std::net::TcpStream = sock.into();
                let s = compio::net::TcpSocket::from_std_stream(std_stream)?;
                s.connect(addr).await?
            }
        };
        let _ = inner.set_nodelay(true);
        Ok(TcpConn { inner })
    }
}

/// A TCP listener on the current loop.
pub struct TcpAcceptor {
    inner: compio::net::TcpListener,
}

impl TcpAcceptor {
    /// Adopt a listener made by [`listen_tcp`] (or a clone of one).
    ///
    /// # Errors
    /// The fd could not be registered with the loop.
    pub fn from_std(l: std::net::TcpListener) -> io::Result<Self> {
        Ok(Self {
            inner: compio::net::TcpListener::from_std(l)?,
        })
    }

    /// Accept one connection.
    ///
    /// # Errors
    /// accept(2) failed (EMFILE and friends are the caller's to back off from).
    pub async fn accept(&self) -> io::Result<(TcpConn, SocketAddr)> {
        let (s, addr) = self.inner.accept().await?;
        // TCP_NODELAY is inherited from the listener (see `listen_tcp`).
        Ok((TcpConn { inner: s }, addr))
    }

    /// The bound address.
    ///
    /// # Errors
    /// getsockname failed.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A Unix listener on the current loop.
pub struct UnixAcceptor {
    inner: compio::net::UnixListener,
}

impl UnixAcceptor {
    /// Adopt a listener made by [`listen_unix`].
    ///
    /// # Errors
    /// The fd could not be registered with the loop.
    pub fn from_std(l: std::os::unix::net::UnixListener) -> io::Result<Self> {
        Ok(Self {
            inner: compio::net::UnixListener::from_std(l)?,
        })
    }

    /// Accept one connection.
    ///
    /// # Errors
    /// accept(2) failed.
    pub async fn accept(&self) -> io::Result<UnixConn> {
        let (s, _) = self.inner.accept().await?;
        Ok(UnixConn { inner: s })
    }
}

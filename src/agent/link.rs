//! The agent's way to the metadata API, per loop: the pooled keep-alive
//! TCP client ([`forward::Pool`], `metaproxy agent` and `metaproxy ovn`), or
//! the API stage run on the same loop (`metaproxy up`).
//!
//! In `up` the API is in the same process, and the agent stage already runs
//! on the proxy's loops ([`super::daemon::Stage`]). Its last hop was a
//! loopback TCP connection from those loops to the API's own loops: a write
//! and a read on each side and the API loop's wakeup, about 10 µs of the
//! path's cost per request (BENCHMARKS.md, issue 13). [`ApiLink::InProcess`]
//! hands the request the agent wrote ([`forward::write_api_request`]'s bytes,
//! `X-Instance-ID-Signature` included) to the API's [`LoopStage`] on the
//! same thread: the API parses it with its own limits, verifies the
//! signature and renders exactly as its connection would, and the answer's
//! bytes are framed here as the pool frames a response read from the
//! socket. So everything on either side of the hop (the agent's relay, its
//! 404 retry, 500 on an unexpected status, both stages' access logs and
//! counters) is the code that runs over TCP, and the answers are the same
//! bytes. The API keeps listening on `api.listen` for anyone else.
//!
//! Rejected: calling `MetadataApi::handle_async` with the agent's ids and
//! no request bytes at all. It would skip the API's parse and its
//! signature check, which the API must do on every request whoever hands
//! it over (issue 13: "no skipped signature checks"); and every difference
//! between that shortcut and the socket path would be a way for `up` to
//! answer differently from the chain.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::agent::forward::{self, ApiResponse, ForwardError};
use crate::api::server::LoopStage;
use crate::http::{self, Limits};
use crate::rt;
use crate::serve::Server;

/// How one loop's agent stage reaches the metadata API.
///
/// The handler is generic over the (crate-private) `Link` of each variant
/// rather than matching this enum where it awaits the exchange: a
/// request's future holds the exchange of its own link only. Matched
/// inside, every request task on the agent's socket carried room for the
/// in-process stage's render: 10 224 bytes per task in the release build,
/// allocated and moved per request, where 3 776 do.
pub enum ApiLink {
    /// Over the network: the pooled keep-alive TCP (or TLS) client.
    Pool(Rc<forward::Pool>),
    /// The API stage on this same loop (`metaproxy up`).
    InProcess(Rc<InProcessApi>),
}

/// The API stage on the agent stage's own loop.
pub struct InProcessApi {
    /// This loop's API state.
    pub api: Rc<LoopStage>,
    /// This loop's buffers (the answers are built in them).
    pub server: Rc<Server>,
    /// `[agent.nova] timeout`, as the pool holds an exchange to it.
    pub timeout: Duration,
}

/// One way to the API: what [`super::handler`] forwards through.
pub(crate) trait Link {
    /// Send `req` (a complete request, as [`forward::write_api_request`]
    /// wrote it) and return the API's whole response.
    ///
    /// # Errors
    /// See [`ForwardError`]; in-process only `Timeout` (the handler, a
    /// database query of the Nova source say, took longer than `timeout`)
    /// and `Broken` (an answer that does not frame, which the API never
    /// writes).
    async fn request(&self, req: &[u8], is_head: bool) -> Result<ApiResponse, ForwardError>;

    /// Give a response's bytes back once they were relayed.
    fn recycle(&self, buf: Vec<u8>);
}

impl Link for forward::Pool {
    async fn request(&self, req: &[u8], is_head: bool) -> Result<ApiResponse, ForwardError> {
        forward::Pool::request(self, req, is_head).await
    }

    fn recycle(&self, buf: Vec<u8>) {
        forward::Pool::recycle(self, buf);
    }
}

impl Link for InProcessApi {
    async fn request(&self, req: &[u8], is_head: bool) -> Result<ApiResponse, ForwardError> {
        let mut out = self.server.take_buf();
        // An inventory answer is ready at its first poll, and then the
        // deadline's timer is never armed.
        let deadline = Instant::now() + self.timeout;
        if rt::with_deadline(deadline, self.api.exchange(req, &mut out))
            .await
            .is_err()
        {
            self.server.put_buf(out);
            return Err(ForwardError::Timeout);
        }
        frame(out, is_head)
    }

    fn recycle(&self, buf: Vec<u8>) {
        self.server.put_buf(buf);
    }
}

/// The API's answer framed as the pool frames one read from its socket
/// (its limits and response bound), so the relay sees the same head.
fn frame(bytes: Vec<u8>, is_head: bool) -> Result<ApiResponse, ForwardError> {
    let framed = http::frame_response(
        &bytes,
        &Limits::default(),
        is_head,
        forward::MAX_RESPONSE_BYTES,
        true,
    );
    match framed {
        Ok(Some((len, head))) if len == bytes.len() => Ok(ApiResponse { bytes, head }),
        Ok(Some(_)) => Err(ForwardError::Broken(
            "bytes after the in-process answer".into(),
        )),
        Ok(None) => Err(ForwardError::Broken("in-process answer cut off".into())),
        Err(why) => Err(ForwardError::Broken(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_frames_as_one_read_from_the_socket_would() {
        let get = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc";
        let r = frame(get.to_vec(), false).unwrap();
        assert_eq!(r.head.status, 200);
        assert_eq!(&r.payload_ref()[..], b"abc");
        // After a HEAD the length is the GET's and no body follows.
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        let r = frame(head.to_vec(), true).unwrap();
        assert!(r.payload_ref().is_empty());
        // Anything else is broken, never relayed as if it were an answer.
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab";
        assert!(matches!(
            frame(cut.to_vec(), false),
            Err(ForwardError::Broken(_))
        ));
        let two = [&get[..], &get[..]].concat();
        assert!(matches!(frame(two, false), Err(ForwardError::Broken(_))));
    }
}

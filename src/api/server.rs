//! Serving the router over HTTP/1.1: our own accept loop over hyper's connections, so that what
//! happens below the router answers in OpenAI's shape too and slow clients cannot hold the front.
//!
//! - **hyper's own errors.** A request hyper cannot parse is answered by hyper itself, with an empty
//!   body, before the router sees anything: 400 (a malformed request line or header, conflicting
//!   `Content-Length`s), 431 (a head over hyper's ~400 KiB buffer or with over 100 headers), 414
//!   (a URL over 64 KiB). hyper then closes the connection. The connection's IO ([`Wire`])
//!   recognises that answer as it is written — the only head hyper makes on its own: a status
//!   line, `connection: close`, `content-length: 0`, `date` and nothing else, where every answer
//!   of the router has a `content-type` — and writes the OpenAI-shaped one in its place. The
//!   check reads the last bytes of a write only; everything else passes through untouched.
//! - **Slow clients.** Each connection has one timer, set from what it waits for ([`Activity`]):
//!   the first request's head (`server.header_read_timeout_ms` from the opening), a head under way
//!   on a kept-alive connection (the same, from its first byte), or the next request
//!   (`server.idle_timeout_ms`). A head that does not arrive in time gets a 408 and the connection
//!   is closed; an idle connection is closed. While a request is answered there is no timer —
//!   an event stream lives as long as it needs — unless the client stops reading the answer
//!   (writes refused for `idle_timeout_ms`: closed). A request's body has its own deadline,
//!   `server.body_read_timeout_ms` after its head, kept by the body ([`DeadlineBody`]): the
//!   handler reading it gets an error and answers 408 (see [`is_body_timeout`]); a handler that
//!   does not read it has answered already, and hyper closes the connection after the answer.
//! - **At most `server.max_connections` connections.** Past it the loop stops accepting: new
//!   connections wait in the kernel's listen backlog (and are refused once it is full) until one
//!   closes.
//! - **Closing.** When a connection ends (unless it was cut as idle or not reading), its write
//!   side is shut and what the client still sends is read and dropped for up to two seconds (a
//!   lingering close), so that a client still sending — an oversized body, a head hyper refused —
//!   reads the answer instead of a reset.
//! - **Shutdown**: the loop stops accepting, every connection finishes the request it is
//!   answering and closes; idle ones close at once.

use std::{
    convert::Infallible,
    error::Error as StdError,
    future::{poll_fn, Future},
    io,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes, HttpBody},
    http::{Request, Response, StatusCode},
    routing::future::RouteFuture,
    Router,
};
use hyper::{
    body::{Frame, Incoming, SizeHint},
    server::conn::http1,
};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;

use super::ApiError;
use crate::config::ServerConfig;

/// How long a lingering close reads what the client still sends, at most...
const LINGER: Duration = Duration::from_secs(2);
/// ...and how long it waits for more once the client is silent.
const LINGER_SILENCE: Duration = Duration::from_millis(250);
/// How long the answer to a head that timed out may take to write.
const ANSWER_WRITE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    body: Duration,
    idle: Duration,
}

impl From<&ServerConfig> for Timeouts {
    fn from(config: &ServerConfig) -> Self {
        Self {
            header: Duration::from_millis(config.header_read_timeout_ms),
            body: Duration::from_millis(config.body_read_timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets every connection finish the request
/// it is answering. Dropping the future drops every connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let timeouts = Timeouts::from(config);
    let mut http = http1::Builder::new();
    // Our timer keeps the head's deadline; hyper's would also cut idle keep-alive connections.
    http.keep_alive(true).header_read_timeout(None);
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            stream,
            http.clone(),
            router.clone(),
            timeouts,
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// A failed accept. Errors of one connection (reset before it was accepted) pass; others (out of
/// file descriptors) would repeat at once, so the loop pauses.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; pausing for a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// How a connection ended, when it was not hyper that ended it.
enum End {
    Served(Result<(), hyper::Error>),
    TimedOut(Wait),
}

/// Serves one connection: hyper drives it, our timer cuts it when the client is too slow.
async fn connection(
    stream: TcpStream,
    http: http1::Builder,
    router: Router,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    // Event streams write small frames that should leave at once.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let wire = Wire {
        stream,
        activity: activity.clone(),
        substitute: None,
        substituted: false,
    };
    let service = Tracked {
        router,
        activity: activity.clone(),
        body_timeout: timeouts.body,
    };
    let mut conn = http.serve_connection(TokioIo::new(wire), service);
    let mut timer = pin!(tokio::time::sleep(timeouts.idle));
    let mut armed: Option<Instant> = None;
    let mut stopping = pin!(shutdown.cancelled());
    let mut draining = false;
    let end = poll_fn(|cx| {
        if !draining && stopping.as_mut().poll(cx).is_ready() {
            draining = true;
            Pin::new(&mut conn).graceful_shutdown();
        }
        if let Poll::Ready(served) = Pin::new(&mut conn).poll(cx) {
            return Poll::Ready(End::Served(served));
        }
        // Whatever changed what the connection waits for changed inside `conn.poll`: the
        // deadline is read again after each.
        let Some((deadline, wait)) = activity.deadline(&timeouts) else {
            armed = None;
            return Poll::Pending;
        };
        if armed != Some(deadline) {
            timer.as_mut().reset(deadline);
            armed = Some(deadline);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(End::TimedOut(wait))
    })
    .await;
    let linger = match &end {
        End::Served(Ok(())) => true,
        End::Served(Err(e)) => {
            tracing::debug!(error = %e, "connection ended by an error");
            true
        }
        End::TimedOut(wait) => {
            tracing::debug!(?wait, "connection timed out");
            matches!(wait, Wait::Head)
        }
    };
    let mut wire = conn.into_parts().io.into_inner();
    if let End::TimedOut(Wait::Head) = end {
        let answer = error_response(&ApiError::RequestTimeout);
        let _ = tokio::time::timeout(ANSWER_WRITE, wire.stream.write_all(&answer)).await;
    }
    if linger && !shutdown.is_cancelled() {
        wire.close_gently().await;
    }
}

/// What a connection waits for when its timer fires.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wait {
    /// Its first request, nothing of it received yet.
    FirstRequest,
    /// The rest of a request head, part of which arrived.
    Head,
    /// The next request on a kept-alive connection.
    NextRequest,
    /// A client that reads nothing of the answer being written.
    Reader,
}

/// What a connection is doing, kept by its IO and its requests, read by its timer. All of it is
/// touched from the connection's task only; atomics make it shareable, not contended.
struct Activity {
    opened: Instant,
    /// Requests whose answer is not finished (one at most: HTTP/1.1 answers in order).
    answering: AtomicUsize,
    /// When the last answer ended, in ms since `opened` plus one; 0 before the first answer.
    waiting_since: AtomicU64,
    /// When the first byte of the next request arrived, as above; 0 while none did.
    first_byte: AtomicU64,
    /// Since when the client refuses what is written, as above; 0 while it reads.
    write_blocked: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            answering: AtomicUsize::new(0),
            waiting_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, mark: u64, after: Duration) -> Instant {
        self.opened + Duration::from_millis(mark - 1) + after
    }

    /// When the connection gives up on its client, and what it was waiting for; `None` while a
    /// request is answered and the client reads.
    fn deadline(&self, timeouts: &Timeouts) -> Option<(Instant, Wait)> {
        if self.answering.load(Relaxed) > 0 {
            let blocked = self.write_blocked.load(Relaxed);
            return (blocked != 0).then(|| (self.at(blocked, timeouts.idle), Wait::Reader));
        }
        let first_byte = self.first_byte.load(Relaxed);
        match self.waiting_since.load(Relaxed) {
            0 if first_byte == 0 => Some((self.opened + timeouts.header, Wait::FirstRequest)),
            0 => Some((self.opened + timeouts.header, Wait::Head)),
            _ if first_byte != 0 => Some((self.at(first_byte, timeouts.header), Wait::Head)),
            since => Some((self.at(since, timeouts.idle), Wait::NextRequest)),
        }
    }

    /// Bytes arrived. Between requests, they start the next head.
    fn read(&self) {
        if self.answering.load(Relaxed) == 0 && self.first_byte.load(Relaxed) == 0 {
            self.first_byte.store(self.now(), Relaxed);
        }
    }

    fn request_started(&self) {
        self.answering.fetch_add(1, Relaxed);
        self.first_byte.store(0, Relaxed);
    }

    fn answer_ended(&self) {
        if self.answering.fetch_sub(1, Relaxed) == 1 {
            self.waiting_since.store(self.now(), Relaxed);
        }
    }

    fn write_refused(&self) {
        if self.write_blocked.load(Relaxed) == 0 {
            self.write_blocked.store(self.now(), Relaxed);
        }
    }

    fn written(&self) {
        if self.write_blocked.load(Relaxed) != 0 {
            self.write_blocked.store(0, Relaxed);
        }
    }
}

/// The connection's IO as hyper sees it: the socket, telling [`Activity`] what passes, with
/// hyper's own error answers replaced by OpenAI-shaped ones.
struct Wire {
    stream: TcpStream,
    activity: Arc<Activity>,
    /// What is left to write of the answer written in place of hyper's.
    substitute: Option<Bytes>,
    substituted: bool,
}

impl Wire {
    fn write_through(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note(&written);
        written
    }

    fn note(&self, written: &Poll<io::Result<usize>>) {
        match written {
            Poll::Pending => self.activity.write_refused(),
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.written(),
            Poll::Ready(_) => {}
        }
    }

    /// hyper's error head is in hand: the OpenAI-shaped answer takes its place.
    fn substitute(&mut self, cx: &mut Context<'_>, status: StatusCode) -> io::Result<()> {
        let error = match status {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadersTooLarge,
            StatusCode::URI_TOO_LONG => ApiError::UriTooLong,
            _ => ApiError::MalformedRequest,
        };
        tracing::debug!(%status, "a request hyper could not parse; answering in OpenAI's shape");
        self.substitute = Some(error_response(&error));
        self.substituted = true;
        // Started now; whatever the socket does not take yet goes with hyper's flush.
        match self.poll_substitute(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn poll_substitute(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = &mut self.substitute {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let _ = rest.split_to(n);
            if rest.is_empty() {
                self.substitute = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Shuts the write side, then reads and drops what the client still sends, until it closes,
    /// falls silent, or [`LINGER`] is over.
    async fn close_gently(&mut self) {
        let stream = &mut self.stream;
        let _ = tokio::time::timeout(ANSWER_WRITE, stream.shutdown()).await;
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 8192];
            while let Ok(Ok(n)) = tokio::time::timeout(LINGER_SILENCE, stream.read(&mut sink)).await
            {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.substituted {
            // hyper writes nothing after its error head; should it, it is not sent.
            ready!(this.poll_substitute(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        match own_error_at(buf) {
            None => this.write_through(cx, buf),
            Some((0, status)) => {
                this.substitute(cx, status)?;
                Poll::Ready(Ok(buf.len()))
            }
            // What precedes it first (the end of an earlier answer).
            Some((at, _)) => this.write_through(cx, &buf[..at]),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total = bufs.iter().map(|b| b.len()).sum();
        if this.substituted {
            ready!(this.poll_substitute(cx))?;
            return Poll::Ready(Ok(total));
        }
        let last = bufs.iter().rposition(|b| !b.is_empty());
        let found = last.and_then(|i| own_error_at(&bufs[i]).map(|(at, status)| (i, at, status)));
        let Some((i, at, status)) = found else {
            let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
            this.note(&written);
            return written;
        };
        if at == 0 && bufs[..i].iter().all(|b| b.is_empty()) {
            this.substitute(cx, status)?;
            return Poll::Ready(Ok(total));
        }
        // What precedes it first, one slice at a time.
        let first = bufs.iter().position(|b| !b.is_empty()).expect("one is");
        let end = if first == i { at } else { bufs[first].len() };
        this.write_through(cx, &bufs[first][..end])
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_substitute(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_substitute(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// Where hyper's own error head starts in `buf`, when `buf` ends with one, and its status: the
/// status line of a 400, 414 or 431, then `connection: close`, `content-length: 0` and `date`
/// (each header at most once, `content-length` required) and nothing else. No answer of the
/// router looks so (each has a `content-type`), and no body holds a bare CRLF (they are JSON, or
/// event streams of JSON lines).
fn own_error_at(buf: &[u8]) -> Option<(usize, StatusCode)> {
    // The longest: "HTTP/1.1 431 Request Header Fields Too Large", the three headers, a blank line.
    const WINDOW: usize = 160;
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let from = buf.len().saturating_sub(WINDOW);
    let window = &buf[from..];
    let start = window.windows(7).rposition(|w| w == b"HTTP/1.")?;
    let head = std::str::from_utf8(&window[start..window.len() - 4]).ok()?;
    let mut lines = head.split("\r\n");
    let line = lines.next()?.as_bytes();
    if line.len() < 12 || line[8] != b' ' {
        return None;
    }
    let status = StatusCode::from_bytes(&line[9..12]).ok()?;
    if !matches!(status.as_u16(), 400 | 414 | 431) {
        return None;
    }
    let (mut close, mut length, mut date) = (false, false, false);
    for line in lines {
        let seen = match line {
            "connection: close" => &mut close,
            "content-length: 0" => &mut length,
            l if l.starts_with("date: ") => &mut date,
            _ => return None,
        };
        if std::mem::replace(seen, true) {
            return None;
        }
    }
    length.then_some((from + start, status))
}

/// `error` as a whole HTTP/1.1 answer that closes the connection.
fn error_response(error: &ApiError) -> Bytes {
    let (status, body) = error.openai();
    let body = body.to_string();
    let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT");
    Bytes::from(format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\ndate: {date}\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    ))
}

/// The router as hyper calls it: each request's body gets its deadline, and the request counts
/// as answered from its head until the last byte of its answer.
struct Tracked {
    router: Router,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Answer>;
    type Error = Infallible;
    type Future = Answering;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.request_started();
        let guard = AnswerGuard(self.activity.clone());
        let deadline = Instant::now() + self.body_timeout;
        let request = request.map(|body| DeadlineBody {
            body,
            deadline,
            limit: self.body_timeout,
            timer: None,
        });
        // A router is always ready (its `poll_ready` answers `Ready` at once).
        let future = tower_service::Service::call(&mut self.router.clone(), request);
        Answering {
            future,
            guard: Some(guard),
        }
    }
}

/// Ends the request's answer when dropped: with the answer's body (sent, or dropped with the
/// connection), or with the handler's future if it never answered.
struct AnswerGuard(Arc<Activity>);

impl Drop for AnswerGuard {
    fn drop(&mut self) {
        self.0.answer_ended();
    }
}

pin_project! {
    /// The router's future; its answer carries the guard.
    struct Answering {
        #[pin]
        future: RouteFuture<Infallible>,
        guard: Option<AnswerGuard>,
    }
}

impl Future for Answering {
    type Output = Result<Response<Answer>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.future.poll(cx));
        let guard = this.guard.take().expect("polled after completion");
        Poll::Ready(Ok(response.map(|body| Answer {
            body,
            _guard: guard,
        })))
    }
}

pin_project! {
    /// An answer's body, holding the request's [`AnswerGuard`] until hyper is done with it.
    struct Answer {
        #[pin]
        body: Body,
        _guard: AnswerGuard,
    }
}

impl HttpBody for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that did not arrive whole within `server.body_read_timeout_ms` of its head.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTimedOut(Duration);

/// Whether `error`, or an error it wraps, is a [`BodyTimedOut`].
pub(super) fn is_body_timeout(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<BodyTimedOut>() {
            return true;
        }
        next = e.source();
    }
    false
}

pin_project! {
    /// A request body with a deadline. Its timer starts only if the body is waited for.
    struct DeadlineBody {
        #[pin]
        body: Incoming,
        deadline: Instant,
        limit: Duration,
        #[pin]
        timer: Option<Sleep>,
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.timer.is_none() {
            this.timer
                .set(Some(tokio::time::sleep_until(*this.deadline)));
        }
        let timer = this.timer.as_pin_mut().expect("set above");
        ready!(timer.poll(cx));
        Poll::Ready(Some(Err(BodyTimedOut(*this.limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "date: Tue, 25 Nov 2026 10:00:00 GMT\r\n";

    #[test]
    fn hypers_own_error_heads_are_recognised_and_nothing_else() {
        for (line, code) in [
            ("HTTP/1.1 400 Bad Request", 400),
            ("HTTP/1.1 414 URI Too Long", 414),
            ("HTTP/1.1 431 Request Header Fields Too Large", 431),
            ("HTTP/1.0 400 Bad Request", 400),
        ] {
            let head = format!("{line}\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n");
            assert_eq!(
                own_error_at(head.as_bytes()),
                Some((0, StatusCode::from_u16(code).unwrap()))
            );
            let bare = format!("{line}\r\ncontent-length: 0\r\n\r\n");
            assert_eq!(own_error_at(bare.as_bytes()).map(|f| f.0), Some(0));
            // After the end of an earlier answer.
            let after = format!("{{\"a\":1}}{head}");
            assert_eq!(own_error_at(after.as_bytes()).map(|f| f.0), Some(7));
            let no_close = format!("{line}\r\ncontent-length: 0\r\n{DATE}\r\n");
            assert_eq!(own_error_at(no_close.as_bytes()).map(|f| f.0), Some(0));
        }
        for answer in [
            format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n{DATE}\r\n"),
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ncontent-type: application/json\r\n{DATE}\r\n"),
            format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n{DATE}\r\n"),
            format!("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n{DATE}\r\n"),
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n{DATE}\r\n"),
            format!("HTTP/1.1 400 Bad Request\r\nconnection: close\r\n{DATE}\r\n"),
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n".to_string(),
            "0\r\n\r\n".to_string(),
            "HTTP/1.1 100 Continue\r\n\r\n".to_string(),
        ] {
            assert_eq!(own_error_at(answer.as_bytes()), None, "{answer}");
        }
    }

    #[test]
    fn an_error_response_is_openai_shaped_and_closes() {
        let bytes = error_response(&ApiError::HeadersTooLarge);
        let text = std::str::from_utf8(&bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("\r\ncontent-type: application/json\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
        assert!(head.contains("\r\nconnection: close\r\n"));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}

//! The HTTP server: remixd's own accept loop and connection supervisor around hyper,
//! in place of `axum::serve`, which caps nothing and times nothing out.
//!
//! `axum::serve` keeps a connection as long as its client likes: one that never sends
//! a byte, sends half a request head, or half a body holds a file descriptor for ever,
//! and a thousand of them (no key needed) exhaust the usual 1,024 open files so that
//! `accept` fails and `/healthz` stops answering. Here every connection is watched by
//! a small supervisor that knows its phase from the bytes it reads and the requests it
//! serves:
//!
//! - **head** — a request head must arrive within `server.header_timeout_ms`, counted
//!   from the connection's start for its first request and from the first byte for
//!   later ones;
//! - **idle** — a kept-alive connection may wait `server.idle_timeout_ms` between
//!   requests;
//! - **body** — a request body must arrive in full within `server.body_timeout_ms` of
//!   its head. The body itself yields [`remixd_api::BodyTimeout`] then, so the handler
//!   reading it answers a 422 envelope; a connection whose handler does not read it is
//!   dropped shortly after the deadline.
//!
//! hyper's own `header_read_timeout` is not used: in the hyper of Cargo.lock (1.x) its
//! timer also runs while a kept-alive connection waits for its next request, so it
//! cannot give the first request and later ones different allowances, nor tell an idle
//! connection from a slow one.
//!
//! **The connection cap** (`server.max_connections`, by default derived from the
//! open-files limit). At the cap a new connection is still accepted, and the oldest
//! connection that is not doing useful work is closed to make room. Connections
//! younger than a grace (the header timeout, at most 1 s) go last, oldest first, so
//! a new client always gets a moment to send its request; the others go in this order:
//! connections that have not yet completed a request and have none in flight (idle
//! since their start, or still sending their first head: what a slow-loris attacker
//! holds), then idle or head-sending connections that have been served before, then
//! connections whose request body is still arriving, then waiting connections whose
//! client has sent bytes the server has not read yet (a complete request may be sitting
//! there while the server is busy), then connections whose response the client is not
//! reading. A connection whose request is being handled or streamed is never closed
//! for room. So an attacker without a key, who can only hold
//! connections of the first kinds, cannot keep a real client out: each new connection
//! pushes out the attacker's oldest, and `/healthz` is served (a new client loses its
//! place only if the attacker opens `max_connections` connections before the client's
//! head arrives). Only when every connection is in the last kind is a new one closed
//! at once; those are requests of clients with keys, bounded by their own limits.
//!
//! **Accept errors** (EMFILE, ENFILE, ENOBUFS, …) are answered with an exponential
//! pause (5 ms doubling to 1 s) instead of a busy loop; errors that concern only the
//! connection being accepted are skipped.
//!
//! **Shutdown**: accepting stops, idle connections close, requests in flight finish
//! (SSE streams end on their own when the API sees the same token), and after
//! `server.shutdown_timeout_ms` whatever is left is dropped.
//!
//! **hyper's own answers**: requests hyper cannot parse (a bad request line, header or
//! framing: 400; a URI too long: 414; a head too large: 431) are answered by hyper
//! before any service runs, with an empty body. [`Watched`] recognises exactly that
//! bare head on the way out and sends the contract's envelope in its place.
//!
//! HTTP/1.1 only, as `axum::serve` served it in this build (axum's `http2` feature is
//! off, so there is no h2c). hyper-util's `auto` builder is kept, so turning h2c on is
//! a matter of features; the phase tracking counts requests, not connections, and
//! would hold for HTTP/2 too.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Settings;

/// How the server treats connections.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    /// `api.error_http_status = "always-200"`: hyper's own error answers get HTTP 200
    /// like every other envelope.
    pub always_200: bool,
}

/// Descriptors kept for everything but client connections: the database (a writer and
/// up to eight readers, each with its WAL and shared-memory files), the runtime, logs,
/// listeners and file storage (64 more).
const FIXED_RESERVE: u64 = 128;
/// Bounds of the derived connection cap: below 16 the server is unusable; above 16,384
/// the memory of the connections, not descriptors, becomes the limit to think about.
const DERIVED_MIN: u64 = 16;
const DERIVED_MAX: u64 = 16_384;

/// The connection cap when `server.max_connections = 0`: half of what the open-files
/// limit leaves after the reserve for the database and runtime, the callback
/// deliveries (`callbacks.concurrency`) and input fetches (`worker.fetch_concurrency`,
/// a socket and a redirect's socket each). Half, because a request in flight may hold
/// a second descriptor (a stored file it reads or writes).
pub fn derived_max_connections(nofile: u64, s: &Settings) -> usize {
    let reserve =
        FIXED_RESERVE + s.callbacks.concurrency as u64 + 2 * s.worker.fetch_concurrency as u64;
    (nofile.saturating_sub(reserve) / 2).clamp(DERIVED_MIN, DERIVED_MAX) as usize
}

impl ServeConfig {
    /// The settings' values; `nofile` is the open-files limit in force.
    pub fn from_settings(s: &Settings, nofile: u64) -> Self {
        let srv = &s.server;
        Self {
            header_timeout: Duration::from_millis(srv.header_timeout_ms),
            body_timeout: Duration::from_millis(srv.body_timeout_ms),
            idle_timeout: Duration::from_millis(srv.idle_timeout_ms),
            max_connections: match srv.max_connections {
                0 => derived_max_connections(nofile, s),
                n => n,
            },
            shutdown_timeout: Duration::from_millis(srv.shutdown_timeout_ms),
            always_200: s.api.error_http_status == remixd_api::ErrorHttpStatus::Always200,
        }
    }
}

/// Raises the soft open-files limit (RLIMIT_NOFILE) to the hard one and logs both;
/// returns the soft limit now in force (1,024 assumed if it cannot be read).
pub fn raise_nofile_limit() -> u64 {
    let (soft, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-files limit; assuming 1024");
            return 1024;
        }
    };
    match rlimit::increase_nofile_limit(hard) {
        Ok(now) => {
            tracing::info!(
                before = soft,
                soft = now,
                hard,
                "open-files limit (RLIMIT_NOFILE)"
            );
            now
        }
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
            soft
        }
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then drains (see the module doc).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: ServeConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let cfg = Arc::new(cfg);
    let registry = Arc::new(Registry::new(
        cfg.max_connections,
        cfg.header_timeout.min(MAX_GRACE),
    ));
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let tasks = TaskTracker::new();
    let mut backoff: Option<Duration> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = None;
                let Some(conn) = registry.admit(Some(stream.as_raw_fd())) else {
                    continue; // dropping the stream closes it
                };
                tasks.spawn(run_connection(
                    stream,
                    conn,
                    builder.clone(),
                    app.clone(),
                    cfg.clone(),
                    registry.clone(),
                    shutdown.clone(),
                ));
                // Lets the new connection read its head before the next accept: in a
                // burst of accepts (a flood) a real client's request is then seen
                // as in flight before the flood can push its connection out.
                tokio::task::yield_now().await;
            }
            Err(e) if concerns_only_this_connection(&e) => {}
            Err(e) => {
                let wait = backoff.map_or(MIN_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                backoff = Some(wait);
                tracing::warn!(error = %e, pause_ms = wait.as_millis() as u64,
                    open = registry.len(), "accept failed; pausing before the next accept");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(cfg.shutdown_timeout, tasks.wait())
        .await
        .is_err()
    {
        let left = registry.close_all();
        tracing::warn!(
            connections = left,
            "connections still open after server.shutdown_timeout_ms; dropping them"
        );
        tasks.wait().await;
    }
    Ok(())
}

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Errors of `accept` that are about the one pending connection (it was reset, or its
/// network went away), not about the listener or the process: the next accept can
/// follow at once. Everything else (out of descriptors or memory) is paused on.
fn concerns_only_this_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted
            | ConnectionReset
            | ConnectionRefused
            | Interrupted
            | WouldBlock
            | NetworkDown
            | NetworkUnreachable
            | HostUnreachable
    )
}

/// Serves one connection and enforces its timeouts; ends when hyper is done with it,
/// when a timeout expires, or when it is closed for room or at the drain deadline.
async fn run_connection(
    stream: TcpStream,
    conn: Arc<Conn>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    cfg: Arc<ServeConfig>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let io = TokioIo::new(Watched::new(stream, conn.clone(), cfg.always_200));
    let service = ConnService {
        app,
        conn: conn.clone(),
        body_timeout: cfg.body_timeout,
    };
    // Boxed so that it can be dropped explicitly, after the registry forgets the
    // connection: the registry peeks at the socket only while it is registered.
    let mut served = Box::pin(builder.serve_connection(io, service));
    let mut draining = false;
    loop {
        let deadline = conn.deadline(&cfg);
        let timer = async move {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = conn.close.cancelled() => break,
            _ = shutdown.cancelled(), if !draining => {
                served.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = conn.kick.notified() => {}
            _ = timer => {
                if let Some((at, reason)) = conn.deadline(&cfg) {
                    if at <= Instant::now() {
                        metrics::counter!("remixd_http_connections_closed_total", "reason" => reason)
                            .increment(1);
                        tracing::debug!(reason, "closing a connection");
                        break;
                    }
                }
            }
        }
    }
    registry.remove(conn.id);
    drop(served);
}

/// A connection's phase, as far as the timeouts and the cap care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepted; no byte yet.
    Fresh,
    /// Between requests; no byte of the next one yet.
    Idle,
    /// Bytes of a request head have arrived; the head is not complete.
    Head,
    /// A request is being handled, its body read or its response sent.
    Busy,
}

#[derive(Debug)]
struct ConnState {
    phase: Phase,
    /// When the phase's clock started (for `Head` of a first request: the accept).
    since: Instant,
    /// Requests answered on this connection.
    served: u64,
    in_flight: usize,
    /// Requests in flight whose body has not arrived in full.
    receiving: usize,
    body_deadline: Option<Instant>,
}

/// One connection's shared state: the supervisor, the service and the I/O wrapper see it.
struct Conn {
    id: u64,
    accepted: Instant,
    /// The socket, for [`Conn::unread`]; valid while the connection is registered.
    fd: Option<RawFd>,
    state: Mutex<ConnState>,
    /// The last write found the socket full (the client is not reading).
    write_blocked: AtomicBool,
    /// Wakes the supervisor when a phase change moves its deadline.
    kick: tokio::sync::Notify,
    /// Closes the connection now (for room, or at the drain deadline).
    close: CancellationToken,
}

/// How long after its body deadline a connection whose handler never read the body
/// is dropped (a handler that reads it answers 422 at the deadline itself).
const BODY_GRACE: Duration = Duration::from_secs(1);

impl Conn {
    fn new(id: u64, fd: Option<RawFd>) -> Self {
        Self {
            id,
            accepted: Instant::now(),
            fd,
            state: Mutex::new(ConnState {
                phase: Phase::Fresh,
                since: Instant::now(),
                served: 0,
                in_flight: 0,
                receiving: 0,
                body_deadline: None,
            }),
            write_blocked: AtomicBool::new(false),
            kick: tokio::sync::Notify::new(),
            close: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // The state is plain counters; a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes arrived from the client.
    fn bytes_in(&self) {
        let mut s = self.lock();
        match s.phase {
            // The first request's head is timed from the accept.
            Phase::Fresh => s.phase = Phase::Head,
            Phase::Idle => {
                s.phase = Phase::Head;
                s.since = Instant::now();
                drop(s);
                self.kick.notify_one();
            }
            Phase::Head | Phase::Busy => {}
        }
    }

    fn request_started(&self, body_deadline: Option<Instant>) {
        let mut s = self.lock();
        s.in_flight += 1;
        if s.phase != Phase::Busy {
            s.phase = Phase::Busy;
            s.since = Instant::now();
        }
        if let Some(d) = body_deadline {
            s.receiving += 1;
            s.body_deadline = Some(s.body_deadline.map_or(d, |e| e.min(d)));
        }
        drop(s);
        self.kick.notify_one();
    }

    fn body_finished(&self) {
        let mut s = self.lock();
        s.receiving = s.receiving.saturating_sub(1);
        if s.receiving == 0 {
            s.body_deadline = None;
        }
    }

    fn request_finished(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        s.served += 1;
        if s.in_flight == 0 {
            s.phase = Phase::Idle;
            s.since = Instant::now();
            drop(s);
            self.kick.notify_one();
        }
    }

    fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// When this connection is to be closed if nothing changes, and why.
    fn deadline(&self, cfg: &ServeConfig) -> Option<(Instant, &'static str)> {
        let s = self.lock();
        match s.phase {
            Phase::Fresh | Phase::Head => Some((s.since + cfg.header_timeout, "header_timeout")),
            Phase::Idle => Some((s.since + cfg.idle_timeout, "idle_timeout")),
            Phase::Busy => s.body_deadline.map(|d| (d + BODY_GRACE, "body_timeout")),
        }
    }

    /// Whether the client has sent bytes that the server has not read yet (its head
    /// may be complete, waiting for a busy server to get to it), or has closed its side.
    /// Only called by the registry, under its lock, on a registered connection.
    fn unread(&self) -> Unread {
        let Some(fd) = self.fd else {
            return Unread::Nothing;
        };
        // SAFETY: the connection's task drops the socket (closing `fd`) only after
        // removing the connection from the registry, under the registry's lock, which
        // the caller holds; so `fd` is open and is this connection's socket.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut one = [std::mem::MaybeUninit::<u8>::uninit()];
        // The socket is non-blocking: no data is WouldBlock, never a wait.
        match socket2::SockRef::from(&fd).peek(&mut one) {
            Ok(0) => Unread::Closed,
            Ok(_) => Unread::Bytes,
            Err(_) => Unread::Nothing,
        }
    }

    /// How willingly this connection is closed for room (lower first), and since
    /// when it has been so (older first); `None`: never.
    fn rank(&self) -> Option<(u8, Instant)> {
        let s = self.lock();
        let rank = match s.phase {
            Phase::Fresh | Phase::Head if s.served == 0 => 0,
            Phase::Fresh | Phase::Idle | Phase::Head => 1,
            Phase::Busy if s.receiving > 0 => 2,
            // 3: waiting connections with unread bytes (see `Registry::victim`).
            Phase::Busy if self.write_blocked.load(Ordering::Relaxed) => 4,
            Phase::Busy => return None,
        };
        Some((rank, s.since))
    }
}

/// What [`Conn::unread`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unread {
    Nothing,
    Bytes,
    Closed,
}

/// How many waiting connections `Registry::victim` looks at for unread bytes.
const PEEKS: usize = 8;
/// The longest a new connection is protected from being closed for room (the header
/// timeout when shorter; see `Registry::victim`).
const MAX_GRACE: Duration = Duration::from_secs(1);

/// The open connections, oldest first.
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    max: usize,
    /// How long a new connection is closed for room only after older ones.
    grace: Duration,
    /// When a refusal was last logged: at most one line a second, however many.
    refusal_logged: Mutex<Option<Instant>>,
}

impl Registry {
    fn new(max: usize, grace: Duration) -> Self {
        Self {
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            max: max.max(1),
            grace,
            refusal_logged: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Registers a new connection, closing another for room at the cap; `None` when
    /// every open connection is busy with a request (the new one is to be closed).
    fn admit(&self, fd: Option<RawFd>) -> Option<Arc<Conn>> {
        let mut conns = self.lock();
        if conns.len() >= self.max {
            match self.victim(&conns).and_then(|id| conns.remove(&id)) {
                Some(v) => {
                    v.close.cancel();
                    metrics::counter!("remixd_http_connections_closed_total", "reason" => "evicted")
                        .increment(1);
                }
                None => {
                    metrics::counter!("remixd_http_connections_closed_total", "reason" => "refused")
                        .increment(1);
                    let mut logged = self
                        .refusal_logged
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        *logged = Some(Instant::now());
                        tracing::warn!(
                            open = conns.len(),
                            "connection cap reached with every connection busy; closing new ones"
                        );
                    }
                    return None;
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(id, fd));
        conns.insert(id, conn.clone());
        metrics::gauge!("remixd_http_connections").set(conns.len() as f64);
        Some(conn)
    }

    /// The connection to close for room.
    ///
    /// Connections younger than the grace period come last, oldest first, whatever
    /// they are doing: without that, when the rest of the cap is held by connections
    /// of a higher rank (bodies arriving slowly, say), each new connection would be
    /// the lowest-ranked one and be closed by the very next accept, before its client
    /// could send a byte. With it, a new connection survives at least until the grace
    /// has passed or as many newer ones have been accepted as the cap holds.
    ///
    /// Older connections go by rank, then age. A waiting one (rank 0 or 1) whose
    /// client has sent bytes the server has not read yet is passed over for anything
    /// but response-blocked and young ones: under load a real client's complete
    /// request can sit unread for a while. Only the first [`PEEKS`] waiting
    /// candidates are looked at (a system call each).
    fn victim(&self, conns: &BTreeMap<u64, Arc<Conn>>) -> Option<u64> {
        let now = Instant::now();
        let mut ranked: Vec<(bool, u8, Instant, u64)> = conns
            .values()
            .filter_map(|c| {
                let (rank, since) = c.rank()?;
                Some(if now.duration_since(c.accepted) < self.grace {
                    (true, 0, c.accepted, c.id)
                } else {
                    (false, rank, since, c.id)
                })
            })
            .collect();
        ranked.sort_unstable();
        let mut passed_over = None;
        let mut peeks = 0;
        for (young, rank, _, id) in ranked {
            if young {
                return passed_over.or(Some(id));
            }
            if rank <= 1 && peeks < PEEKS {
                peeks += 1;
                if conns[&id].unread() == Unread::Bytes {
                    passed_over = passed_over.or(Some(id));
                    continue;
                }
            }
            if rank >= 4 {
                return passed_over.or(Some(id));
            }
            return Some(id);
        }
        passed_over
    }

    fn remove(&self, id: u64) {
        let mut conns = self.lock();
        conns.remove(&id);
        metrics::gauge!("remixd_http_connections").set(conns.len() as f64);
    }

    /// Closes every connection now; returns how many there were.
    fn close_all(&self) -> usize {
        let conns = self.lock();
        for c in conns.values() {
            c.close.cancel();
        }
        metrics::counter!("remixd_http_connections_closed_total", "reason" => "shutdown_timeout")
            .increment(conns.len() as u64);
        conns.len()
    }
}

/// The router, as hyper calls it on one connection: marks requests in flight, puts a
/// deadline on request bodies and notes when each response is done.
#[derive(Clone)]
struct ConnService {
    app: Router,
    conn: Arc<Conn>,
    body_timeout: Duration,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = hyper::Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let deadline = (!req.body().is_end_stream()).then(|| Instant::now() + self.body_timeout);
        self.conn.request_started(deadline);
        let guard = InFlight(self.conn.clone());
        let req = req.map(|incoming| match deadline {
            Some(at) => Body::new(DeadlineBody {
                inner: incoming,
                sleep: Box::pin(tokio::time::sleep_until(at)),
                limit: self.body_timeout,
                conn: self.conn.clone(),
                done: false,
            }),
            None => Body::new(incoming),
        });
        let app = self.app.clone();
        Box::pin(async move {
            let Ok(resp) = tower::ServiceExt::oneshot(app, req).await;
            Ok(resp.map(|inner| Tracked {
                inner,
                _in_flight: guard,
            }))
        })
    }
}

/// A request in flight; finished when dropped (with its response body, or with the
/// handler's future if the connection goes first).
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that holds its request's [`InFlight`] until hyper is done with it.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body with a deadline for the whole of it. Hand-written because
/// tower-http's body timeout restarts its clock at every frame, so a client sending a
/// byte every few seconds would never reach it.
struct DeadlineBody {
    inner: Incoming,
    sleep: Pin<Box<Sleep>>,
    limit: Duration,
    conn: Arc<Conn>,
    done: bool,
}

impl DeadlineBody {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.conn.body_finished();
        }
    }
}

impl Drop for DeadlineBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                ready!(this.sleep.as_mut().poll(cx));
                this.finish();
                Poll::Ready(Some(Err(Box::new(remixd_api::BodyTimeout(this.limit)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket as hyper sees it: reads move the connection's phase, writes note a
/// client that does not read, and hyper's bare error heads are replaced by envelopes.
struct Watched {
    io: TcpStream,
    conn: Arc<Conn>,
    always_200: bool,
    /// Bytes of a replacement answer not yet written, and how far writing got.
    pending: Vec<u8>,
    written: usize,
}

impl Watched {
    fn new(io: TcpStream, conn: Arc<Conn>, always_200: bool) -> Self {
        Self {
            io,
            conn,
            always_200,
            pending: Vec::new(),
            written: 0,
        }
    }

    fn note<T>(&self, r: &Poll<io::Result<T>>) {
        self.conn
            .write_blocked
            .store(r.is_pending(), Ordering::Relaxed);
    }

    /// Writes what is left of a replacement answer.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let r = Pin::new(&mut self.io).poll_write(cx, &self.pending[self.written..]);
            self.note(&r);
            match ready!(r) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    fn write_one(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        // Only between requests can hyper be writing an answer of its own.
        if self.conn.in_flight() == 0 {
            if let Some(answer) = envelope_for_bare_error(buf, self.always_200) {
                self.pending = answer;
                self.written = 0;
                // The rest goes out on the flush hyper makes next.
                if let Poll::Ready(Err(e)) = self.drain(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(buf.len()));
            }
        }
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(&r);
        r
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.bytes_in();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_one(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (nonempty.next(), nonempty.next()) {
            return self.write_one(cx, only);
        }
        ready!(self.drain(cx))?;
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// hyper's answer to a request it could not parse is exactly a bare head:
/// `HTTP/1.1 400 Bad Request`, `connection: close`, `content-length: 0`, `date: …`.
/// No response of remixd's own looks like that (every error of the router carries an
/// envelope and a content type), so such a write is replaced by the same status with
/// the contract's envelope. Returns the replacement, or `None` for any other write.
fn envelope_for_bare_error(buf: &[u8], always_200: bool) -> Option<Vec<u8>> {
    if buf.len() > 256 {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?.strip_prefix("HTTP/1.1 ")?;
    let (code, _) = status_line.split_once(' ')?;
    let code: u16 = code.parse().ok()?;
    let (reason, msg) = match code {
        400 => (
            "Bad Request",
            "the request is not valid HTTP/1.1 (request line, header or body framing)",
        ),
        414 => ("URI Too Long", "the request URI is too long"),
        431 => (
            "Request Header Fields Too Large",
            "the request's header section is too large",
        ),
        _ => return None,
    };
    let mut empty = false;
    for line in lines {
        let (name, value) = line.split_once(": ")?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" if value == "0" => empty = true,
            "connection" | "date" => {}
            _ => return None,
        }
    }
    if !empty {
        return None;
    }
    let body = serde_json::json!({"code": code, "msg": msg, "data": null}).to_string();
    let status = if always_200 {
        "200 OK".to_string()
    } else {
        format!("{code} {reason}")
    };
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bare_error_heads_are_replaced() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 06:23:57 GMT\r\n\r\n";
        let out = String::from_utf8(envelope_for_bare_error(bare, false).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("content-type: application/json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], 431);
        assert!(v["msg"]
            .as_str()
            .unwrap()
            .contains("header section is too large"));
        assert!(v["data"].is_null());
        let bad = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(envelope_for_bare_error(bad, true).unwrap()).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n"),
            "always-200 applies: {out}"
        );
        assert!(out.contains("\"code\":400"));

        // Anything else passes untouched: a response of the router, a bodied or
        // typed head, another status, part of a head.
        for other in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: x\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"{\"code\":400}",
        ] {
            assert!(envelope_for_bare_error(other, false).is_none(), "{other:?}");
        }
    }

    fn settings_with(callbacks: usize, fetches: usize) -> Settings {
        let mut s = Settings::default();
        s.callbacks.concurrency = callbacks;
        s.worker.fetch_concurrency = fetches;
        s
    }

    #[test]
    fn the_derived_cap_leaves_a_reserve_and_stays_in_bounds() {
        let s = settings_with(32, 4);
        // 1024 − (128 + 32 + 8) = 856, halved.
        assert_eq!(derived_max_connections(1024, &s), 428);
        assert_eq!(derived_max_connections(256, &s), 44);
        assert_eq!(derived_max_connections(100, &s), 16, "never below 16");
        assert_eq!(
            derived_max_connections(1 << 20, &s),
            16_384,
            "never above 16384"
        );
        let mut explicit = Settings::default();
        explicit.server.max_connections = 7;
        assert_eq!(
            ServeConfig::from_settings(&explicit, 1024).max_connections,
            7
        );
        assert_eq!(
            ServeConfig::from_settings(&Settings::default(), 1024).max_connections,
            428
        );
    }

    #[test]
    fn the_cap_closes_the_least_useful_connection_first() {
        let reg = Registry::new(3, Duration::ZERO);
        let a = reg.admit(None).unwrap(); // will be handling a request
        let b = reg.admit(None).unwrap(); // served once, now idle
        let c = reg.admit(None).unwrap(); // fresh: never sent a request
        a.request_started(None);
        b.request_started(None);
        b.request_finished();
        let d = reg.admit(None).expect("room is made");
        assert!(c.close.is_cancelled(), "the fresh connection goes first");
        assert!(!a.close.is_cancelled() && !b.close.is_cancelled());
        d.request_started(Some(Instant::now() + Duration::from_secs(60)));
        let e = reg.admit(None).expect("room is made");
        assert!(b.close.is_cancelled(), "then the idle one");
        e.request_started(None);
        let f = reg.admit(None).expect("room is made");
        assert!(d.close.is_cancelled(), "then one still sending its body");
        assert!(!a.close.is_cancelled() && !e.close.is_cancelled());
        // Now a and e are handling requests and f is fresh: f goes for the next.
        let g = reg.admit(None).unwrap();
        assert!(f.close.is_cancelled());
        g.request_started(None);
        assert!(
            reg.admit(None).is_none(),
            "every connection busy: the new one is refused"
        );
        assert_eq!(reg.len(), 3);
    }

    #[test]
    fn a_waiting_connection_with_unread_bytes_is_passed_over() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut accepted = Vec::new();
        for bytes in [&b"GET /healthz HTTP/1.1\r\n\r\n"[..], b""] {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut c, bytes).unwrap();
            let (s, _) = l.accept().unwrap();
            s.set_nonblocking(true).unwrap();
            accepted.push((c, s));
        }
        // Give the loopback a moment to deliver the first client's bytes.
        std::thread::sleep(Duration::from_millis(50));
        let reg = Registry::new(2, Duration::ZERO);
        let with_bytes = reg.admit(Some(accepted[0].1.as_raw_fd())).unwrap();
        let silent = reg.admit(Some(accepted[1].1.as_raw_fd())).unwrap();
        assert_eq!(with_bytes.unread(), Unread::Bytes);
        assert_eq!(silent.unread(), Unread::Nothing);
        let blocked = reg.admit(None).unwrap();
        assert!(
            silent.close.is_cancelled(),
            "the silent one goes, though younger"
        );
        assert!(!with_bytes.close.is_cancelled());
        // Unread bytes still go before a response the client does not read.
        blocked.request_started(None);
        blocked.write_blocked.store(true, Ordering::Relaxed);
        reg.admit(None).unwrap();
        assert!(with_bytes.close.is_cancelled());
        assert!(!blocked.close.is_cancelled());
        drop(accepted);
    }

    #[test]
    fn new_connections_go_last_and_oldest_first() {
        let reg = Registry::new(2, Duration::from_secs(3600));
        let receiving = reg.admit(None).unwrap();
        receiving.request_started(Some(Instant::now() + Duration::from_secs(60)));
        let fresh = reg.admit(None).unwrap();
        reg.admit(None).unwrap();
        assert!(
            receiving.close.is_cancelled() && !fresh.close.is_cancelled(),
            "within the grace the oldest goes, not the lowest rank"
        );
        // Past the grace, the rank decides again.
        let reg = Registry::new(2, Duration::ZERO);
        let receiving = reg.admit(None).unwrap();
        receiving.request_started(Some(Instant::now() + Duration::from_secs(60)));
        let fresh = reg.admit(None).unwrap();
        reg.admit(None).unwrap();
        assert!(fresh.close.is_cancelled() && !receiving.close.is_cancelled());
    }

    #[test]
    fn deadlines_follow_the_phase() {
        let cfg = ServeConfig {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10,
            shutdown_timeout: Duration::from_secs(1),
            always_200: false,
        };
        let c = Conn::new(0, None);
        let accepted = c.lock().since;
        assert_eq!(
            c.deadline(&cfg),
            Some((accepted + cfg.header_timeout, "header_timeout"))
        );
        c.bytes_in();
        assert_eq!(
            c.deadline(&cfg),
            Some((accepted + cfg.header_timeout, "header_timeout")),
            "the first head is timed from the accept"
        );
        let body_by = Instant::now() + cfg.body_timeout;
        c.request_started(Some(body_by));
        assert_eq!(
            c.deadline(&cfg),
            Some((body_by + BODY_GRACE, "body_timeout"))
        );
        c.body_finished();
        assert_eq!(
            c.deadline(&cfg),
            None,
            "a request being handled has no deadline"
        );
        c.request_finished();
        let (at, why) = c.deadline(&cfg).unwrap();
        assert_eq!(why, "idle_timeout");
        assert!(at >= body_by - cfg.body_timeout + cfg.idle_timeout);
        c.bytes_in();
        let (at2, why) = c.deadline(&cfg).unwrap();
        assert_eq!(why, "header_timeout");
        assert!(at2 < at, "a later head is timed from its first byte");
    }
}

//! Guarded downloads.
//!
//! The guard sits where the connection is made: reqwest asks our [`GuardedResolver`]
//! for addresses, and it returns only the ones the policy admits, so the socket goes to
//! a checked address and no second DNS lookup can swap it (DNS rebinding). reqwest does
//! not consult a resolver for IP-literal hosts, so [`Fetcher::check_url`] checks those
//! itself before every request. Redirects are followed here, not by reqwest, so every
//! hop gets the same checks. Proxies from the environment are ignored: they would
//! bypass the guard.
//!
//! Before the address policy, and whatever `fetch.allow` says, comes the self guard:
//! no connection to this server's own listening address (or its public address), by
//! any spelling. The worker already reads this server's files from storage; the guard
//! is the last line for a spelling or a redirect it did not recognise. For names, the
//! resolver needs the port of the connection being made, which reqwest does not give
//! it: [`Fetcher::download`] passes it in a task-local around each request (read when
//! the connector calls the resolver, which happens inside that request's future).

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use remixd_domain::ServerOrigin;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use crate::images::{probe, FetchedImage};
use crate::policy::AddressPolicy;
use crate::{FetchConfig, FetchError};

/// Most redirect hops followed.
pub const MAX_REDIRECTS: usize = 3;

tokio::task_local! {
    /// The port of the request being sent, for the resolver's self guard.
    static HOP_PORT: u16;
}

/// Whether `ip:port` is this server. `port` is `None` when the caller did not say
/// (a request sent outside [`Fetcher::download`]): then any of this server's ports counts.
fn is_self(origin: &ServerOrigin, ip: IpAddr, port: Option<u16>) -> bool {
    let ip = ip.to_canonical();
    let ports: Vec<u16> = match port {
        Some(p) => vec![p],
        None => origin.ports().collect(),
    };
    ports.into_iter().any(|p| {
        origin.is_self_ip(ip, p)
            || origin.listen().is_some_and(|l| {
                l.port() == p && l.ip().is_unspecified() && is_interface_address(ip)
            })
    })
}

/// Whether `ip` is one of this machine's own addresses, for a listener bound to all of
/// them (`0.0.0.0` / `[::]`). Binding a UDP socket to the address succeeds only for a
/// local one; it sends nothing. (No well-kept crate is needed for this one syscall.)
fn is_interface_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn self_refusal(host: &str, ip: Option<IpAddr>) -> FetchError {
    FetchError::Blocked {
        host: host.to_string(),
        ip,
        why: "this server itself".into(),
    }
}

/// Resolves names and keeps only addresses the policy admits.
#[derive(Debug)]
struct GuardedResolver {
    policy: Arc<AddressPolicy>,
    origin: Option<ServerOrigin>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let origin = self.origin.clone();
        // Read now: `resolve` is called while the request's future is being polled.
        let port = HOP_PORT.try_with(|p| *p).ok();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| {
                    Box::new(FetchError::Unreachable(format!(
                        "cannot resolve {host}: {e}"
                    ))) as Box<dyn StdError + Send + Sync>
                })?
                .collect();
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| {
                    let verdict = match &origin {
                        Some(o) if is_self(o, a.ip(), port) => {
                            Err(self_refusal(&host, Some(a.ip())))
                        }
                        _ => policy.check(&host, a.ip()),
                    };
                    match verdict {
                        Ok(()) => true,
                        Err(e) => {
                            first_refusal.get_or_insert(e);
                            false
                        }
                    }
                })
                .collect();
            if allowed.is_empty() {
                let err = first_refusal
                    .unwrap_or_else(|| FetchError::Unreachable(format!("{host} has no address")));
                return Err(Box::new(err) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Bytes that several downloads share (a task's style images have one budget): each
/// takes what it reads, chunk by chunk, so downloads in parallel cannot overshoot it.
#[derive(Debug)]
pub struct SharedBudget {
    total: u64,
    left: std::sync::atomic::AtomicU64,
}

impl SharedBudget {
    pub fn new(total: u64) -> Self {
        Self {
            total,
            left: std::sync::atomic::AtomicU64::new(total),
        }
    }

    /// Takes `n` bytes; `Err` (and nothing taken) when fewer are left.
    pub fn take(&self, n: u64) -> Result<(), FetchError> {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(n)
            })
            .map(|_| ())
            .map_err(|_| FetchError::GroupTooLarge { limit: self.total })
    }

    fn left(&self) -> u64 {
        self.left.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Downloads under the address policy; cheap to clone.
#[derive(Clone, Debug)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    cfg: Arc<FetchConfig>,
    decoder: crate::DecodeGate,
}

impl Fetcher {
    pub fn new(cfg: FetchConfig) -> Result<Self, FetchError> {
        let policy = Arc::new(AddressPolicy::new(&cfg.allow)?);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
                origin: cfg.origin.clone(),
            }))
            .no_proxy()
            .connect_timeout(Duration::from_secs(10).min(cfg.timeout))
            .user_agent(cfg.user_agent.clone())
            .build()
            .map_err(|e| FetchError::Config(e.to_string()))?;
        Ok(Self {
            client,
            policy,
            decoder: crate::DecodeGate::new(cfg.decode_concurrency),
            cfg: Arc::new(cfg),
        })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.cfg
    }

    /// The process's bound on decodes in flight: every clone of this fetcher shares it.
    pub fn decoder(&self) -> &crate::DecodeGate {
        &self.decoder
    }

    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// A client with the same guard (resolver, no redirects, no proxy), for callbacks.
    /// Callers still run [`Fetcher::check_url`] on each URL first.
    pub fn guarded_client(&self) -> reqwest::Client {
        self.client.clone()
    }

    /// Checks a URL's form, that it does not designate this server, and an IP-literal
    /// host against the policy.
    pub fn check_url(&self, url: &Url) -> Result<(), FetchError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::BadUrl(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(FetchError::BadUrl(
                "URLs with a user name or password are refused".into(),
            ));
        }
        if let (Some(o), Some(host)) = (&self.cfg.origin, url.host()) {
            let port = url.port_or_known_default();
            let ip = match host {
                Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
                Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
                Host::Domain(_) => None,
            };
            let named_self = port.is_some_and(|p| o.designates(&host, p));
            if named_self || ip.is_some_and(|ip| is_self(o, ip, port)) {
                return Err(self_refusal(&host.to_string(), ip));
            }
        }
        match url.host() {
            None => Err(FetchError::BadUrl("no host".into())),
            Some(Host::Ipv4(ip)) => self.policy.check(&ip.to_string(), ip.into()),
            Some(Host::Ipv6(ip)) => self.policy.check(&ip.to_string(), ip.into()),
            Some(Host::Domain(_)) => Ok(()),
        }
    }

    /// GETs `url` under the policy, following at most [`MAX_REDIRECTS`] redirects, reading
    /// at most `max_bytes`, all within the configured timeout.
    pub async fn download(&self, url: &str, max_bytes: u64) -> Result<Bytes, FetchError> {
        self.download_shared(url, max_bytes, None).await
    }

    /// [`Fetcher::download`], also taking every byte read from `shared` when given.
    pub async fn download_shared(
        &self,
        url: &str,
        max_bytes: u64,
        shared: Option<&SharedBudget>,
    ) -> Result<Bytes, FetchError> {
        let secs = self.cfg.timeout.as_secs().max(1);
        tokio::time::timeout(
            self.cfg.timeout,
            self.download_inner(url, max_bytes, shared),
        )
        .await
        .map_err(|_| FetchError::Timeout { secs })?
    }

    async fn download_inner(
        &self,
        url: &str,
        max_bytes: u64,
        shared: Option<&SharedBudget>,
    ) -> Result<Bytes, FetchError> {
        let mut url = Url::parse(url).map_err(|e| FetchError::BadUrl(e.to_string()))?;
        for hop in 0..=MAX_REDIRECTS {
            self.check_url(&url)?;
            let port = url.port_or_known_default().unwrap_or(0);
            let mut resp = HOP_PORT
                .scope(port, self.client.get(url.clone()).send())
                .await
                .map_err(|e| map_reqwest(e, self.cfg.timeout))?;
            let status = resp.status();
            if status.is_redirection() {
                if hop == MAX_REDIRECTS {
                    return Err(FetchError::TooManyRedirects);
                }
                let loc = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or(FetchError::Status(status.as_u16()))?;
                url = url
                    .join(loc)
                    .map_err(|e| FetchError::BadUrl(format!("redirect to {loc:?}: {e}")))?;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status(status.as_u16()));
            }
            if resp.content_length().is_some_and(|n| n > max_bytes) {
                return Err(FetchError::TooLarge { limit: max_bytes });
            }
            if let (Some(b), Some(n)) = (shared, resp.content_length()) {
                if n > b.left() {
                    return Err(FetchError::GroupTooLarge { limit: b.total });
                }
            }
            let mut buf = BytesMut::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| map_reqwest(e, self.cfg.timeout))?
            {
                if (buf.len() + chunk.len()) as u64 > max_bytes {
                    // Stop reading: dropping the response closes the connection.
                    return Err(FetchError::TooLarge { limit: max_bytes });
                }
                if let Some(b) = shared {
                    b.take(chunk.len() as u64)?;
                }
                buf.extend_from_slice(&chunk);
            }
            return Ok(buf.freeze());
        }
        Err(FetchError::TooManyRedirects)
    }

    /// Downloads an image, checks its type from the bytes, that it is complete, and its
    /// displayed dimensions from the header against `max_pixels` (without decoding the
    /// pixels).
    pub async fn fetch_image(&self, url: &str, max_bytes: u64) -> Result<FetchedImage, FetchError> {
        self.fetch_image_shared(url, max_bytes, None).await
    }

    /// [`Fetcher::fetch_image`] under a [`SharedBudget`] as well.
    pub async fn fetch_image_shared(
        &self,
        url: &str,
        max_bytes: u64,
        shared: Option<&SharedBudget>,
    ) -> Result<FetchedImage, FetchError> {
        let bytes = self.download_shared(url, max_bytes, shared).await?;
        let (kind, width, height) = probe(&bytes, self.cfg.max_pixels)?;
        Ok(FetchedImage {
            bytes,
            kind,
            width,
            height,
        })
    }
}

/// Turns a reqwest error into ours, finding a policy refusal from the resolver.
fn map_reqwest(e: reqwest::Error, timeout: Duration) -> FetchError {
    let mut src: Option<&(dyn StdError + 'static)> = Some(&e);
    while let Some(s) = src {
        if let Some(f) = s.downcast_ref::<FetchError>() {
            return f.clone();
        }
        src = s.source();
    }
    if e.is_timeout() {
        return FetchError::Timeout {
            secs: timeout.as_secs().max(1),
        };
    }
    // The innermost cause is the most specific ("Connection refused").
    let mut cause = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    FetchError::Unreachable(cause.to_lowercase())
}

#[cfg(test)]
mod tests {
    //! The self guard inside reqwest's connector, on loopback only.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A loopback server counting requests; returns its address and counter.
    async fn counting_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().fallback(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        (addr, hits)
    }

    fn fetcher_for(me: SocketAddr) -> Fetcher {
        Fetcher::new(FetchConfig {
            allow: vec!["127.0.0.1/32".into(), "::1/128".into()],
            timeout: Duration::from_secs(2),
            origin: Some(ServerOrigin::new("https://remixd.example.com", Some(me)).unwrap()),
            ..FetchConfig::default()
        })
        .unwrap()
    }

    /// A name that resolves to this server is refused by the resolver with the port of
    /// the request in hand: the task-local reaches it through reqwest's connector.
    /// (`localhost` is also refused by name in `check_url`; sending through the client
    /// directly skips that check, so only the resolver stands in the way here.)
    #[tokio::test]
    async fn the_resolver_refuses_this_server_by_its_port() {
        let (me, my_hits) = counting_server().await;
        let (other, other_hits) = counting_server().await;
        let f = fetcher_for(me);
        let send = |port: u16| {
            let req = f.client.get(format!("http://localhost:{port}/x")).send();
            HOP_PORT.scope(port, req)
        };
        let e = send(me.port()).await.unwrap_err();
        assert_eq!(
            map_reqwest(e, Duration::from_secs(2)).to_string(),
            "points to a blocked address 127.0.0.1 (this server itself)"
        );
        // Without the port (a request sent outside `download`), every port of this
        // server counts, so the answer is the same.
        let e = f
            .client
            .get(format!("http://localhost:{}/x", me.port()))
            .send()
            .await
            .unwrap_err();
        assert!(map_reqwest(e, Duration::from_secs(2))
            .to_string()
            .contains("this server itself"));
        assert_eq!(my_hits.load(Ordering::SeqCst), 0, "never contacted");
        // Another loopback server, on another port, is reached through the same name.
        let r = send(other.port()).await.unwrap();
        assert!(r.status().is_success());
        assert_eq!(other_hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn interface_addresses() {
        assert!(is_interface_address("127.0.0.1".parse().unwrap()));
        // TEST-NET-1 is never a local address; binding sends nothing.
        assert!(!is_interface_address("192.0.2.1".parse().unwrap()));
        let o =
            ServerOrigin::new("http://127.0.0.1:9", Some("0.0.0.0:8080".parse().unwrap())).unwrap();
        assert!(is_self(&o, "127.0.0.1".parse().unwrap(), Some(8080)));
        assert!(is_self(&o, "::ffff:127.0.0.1".parse().unwrap(), Some(9)));
        assert!(is_self(&o, "127.0.0.1".parse().unwrap(), None));
        assert!(!is_self(&o, "127.0.0.1".parse().unwrap(), Some(8081)));
        assert!(!is_self(&o, "192.0.2.1".parse().unwrap(), Some(8080)));
    }
}

//! Guarded downloads.
//!
//! The guard sits where the connection is made: reqwest asks our [`GuardedResolver`]
//! for addresses, and it returns only the ones the policy admits, so the socket goes to
//! a checked address and no second DNS lookup can swap it (DNS rebinding). reqwest does
//! not consult a resolver for IP-literal hosts, so [`Fetcher::check_url`] checks those
//! itself before every request. Redirects are followed here, not by reqwest, so every
//! hop gets the same checks. Proxies from the environment are ignored: they would
//! bypass the guard.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use crate::images::{probe, FetchedImage};
use crate::policy::AddressPolicy;
use crate::{FetchConfig, FetchError};

/// Most redirect hops followed.
pub const MAX_REDIRECTS: usize = 3;

/// Resolves names and keeps only addresses the policy admits.
#[derive(Debug)]
struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
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
                .filter(|a| match policy.check(&host, a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        first_refusal.get_or_insert(e);
                        false
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

    /// Checks a URL's form, and an IP-literal host against the policy.
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
        let secs = self.cfg.timeout.as_secs().max(1);
        tokio::time::timeout(self.cfg.timeout, self.download_inner(url, max_bytes))
            .await
            .map_err(|_| FetchError::Timeout { secs })?
    }

    async fn download_inner(&self, url: &str, max_bytes: u64) -> Result<Bytes, FetchError> {
        let mut url = Url::parse(url).map_err(|e| FetchError::BadUrl(e.to_string()))?;
        for hop in 0..=MAX_REDIRECTS {
            self.check_url(&url)?;
            let mut resp = self
                .client
                .get(url.clone())
                .send()
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
        let bytes = self.download(url, max_bytes).await?;
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

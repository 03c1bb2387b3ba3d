//! Which host and port designate this server itself.
//!
//! A URL of this server's own files must never be fetched over HTTP: the fetch would
//! bypass the rule that only the uploading account may use an upload. Clients can spell
//! the same server many ways (`HTTP://127.1:8080`, `localhost.`, `[::1]`, `0.0.0.0`, the
//! public host name, the listen address), so the check works on parsed hosts (the `url`
//! crate's WHATWG parsing has already lower-cased names and turned every IPv4 spelling
//! into an address) and is shared by the store's file-URL classifier and the fetcher's
//! last-line guard. Files kept in a bucket are also named by the bucket's own URLs (the
//! presigned links of `storage.public = "presigned"`): [`ServerOrigin::with_bucket`]
//! makes those this server's files too. Pure: no lookups, no sockets.

use std::net::{IpAddr, SocketAddr};

use url::{Host, Url};

/// This server as clients and the fetcher may reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOrigin {
    /// `server.public_url`'s host, domains without trailing dots.
    public_host: Host<String>,
    /// `server.public_url`'s port (or its scheme's default).
    public_port: u16,
    /// The address the HTTP listener is bound to, once known.
    listen: Option<SocketAddr>,
    /// The URL the storage keys of this server's bucket follow (`scheme://host:port/
    /// path-prefix/`), when its files are in a bucket.
    bucket: Option<Url>,
}

impl ServerOrigin {
    /// From `server.public_url` and the bound listen address; the error names the setting.
    pub fn new(public_url: &str, listen: Option<SocketAddr>) -> Result<Self, String> {
        let u = Url::parse(public_url).map_err(|e| format!("server.public_url: {e}"))?;
        let public_host = match u.host() {
            Some(Host::Domain(d)) => Host::Domain(d.trim_end_matches('.').to_string()),
            Some(Host::Ipv4(ip)) => Host::Ipv4(ip),
            Some(Host::Ipv6(ip)) => Host::Ipv6(ip),
            None => return Err("server.public_url has no host".into()),
        };
        let public_port = u
            .port_or_known_default()
            .ok_or("server.public_url has no port")?;
        Ok(Self {
            public_host,
            public_port,
            listen,
            bucket: None,
        })
    }

    /// This server, whose files are also the objects under `base` (a bucket URL up to
    /// and including the storage's prefix and its final `/`).
    pub fn with_bucket(mut self, base: Url) -> Self {
        self.bucket = Some(base);
        self
    }

    /// The raw (still percent-encoded) path of `url` after the bucket's base, when `url`
    /// names an object of this server's bucket: same scheme, host and port, a path
    /// under the base. Query and fragment (a presigned link's signature) are ignored.
    pub fn bucket_path<'a>(&self, url: &'a Url) -> Option<&'a str> {
        let b = self.bucket.as_ref()?;
        let same_place = url.scheme() == b.scheme()
            && url.host() == b.host()
            && url.port_or_known_default() == b.port_or_known_default();
        same_place
            .then(|| url.path().strip_prefix(b.path()))
            .flatten()
    }

    pub fn listen(&self) -> Option<SocketAddr> {
        self.listen
    }

    /// The ports this server answers on for any of its host spellings.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        std::iter::once(self.public_port).chain(self.listen.map(|l| l.port()))
    }

    fn is_public_ip(&self, ip: IpAddr) -> bool {
        match self.public_host {
            Host::Ipv4(p) => ip == IpAddr::V4(p),
            Host::Ipv6(p) => ip == IpAddr::V6(p).to_canonical(),
            Host::Domain(_) => false,
        }
    }

    /// Whether the public host is a name or address reachable from elsewhere, behind
    /// which a reverse proxy commonly answers on the default ports as well.
    fn public_host_is_remote(&self) -> bool {
        match &self.public_host {
            Host::Domain(d) => !is_localhost_name(d),
            Host::Ipv4(ip) => !is_local_ip((*ip).into()),
            Host::Ipv6(ip) => !is_local_ip((*ip).into()),
        }
    }

    /// Whether `ip` names this host for this server: a loopback or unspecified address,
    /// the listen address or the public address.
    fn is_own_ip(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        is_local_ip(ip)
            || self.listen.is_some_and(|l| l.ip().to_canonical() == ip)
            || self.is_public_ip(ip)
    }

    /// Whether a connection to `ip:port` reaches this server, as far as can be told
    /// without asking the operating system (see the fetcher for interface addresses).
    pub fn is_self_ip(&self, ip: IpAddr, port: u16) -> bool {
        let on_port = self.ports().any(|p| p == port)
            || (self.is_public_ip(ip.to_canonical())
                && self.public_host_is_remote()
                && matches!(port, 80 | 443));
        on_port && self.is_own_ip(ip)
    }

    /// Whether `host` on `port` designates this server.
    ///
    /// Hosts: the public host, `localhost` and names under `.localhost` (RFC 6761),
    /// loopback and unspecified addresses (IPv4-mapped forms included) and the listen
    /// address. Ports: the public port and the listen port; for a public host that is
    /// not local, 80 and 443 too (a reverse proxy in front of remixd answers there).
    pub fn designates(&self, host: &Host<&str>, port: u16) -> bool {
        match host {
            Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                let is_public = matches!(&self.public_host, Host::Domain(p) if *p == d);
                if is_public {
                    return self.ports().any(|p| p == port)
                        || (self.public_host_is_remote() && matches!(port, 80 | 443));
                }
                is_localhost_name(&d) && self.ports().any(|p| p == port)
            }
            Host::Ipv4(ip) => self.is_self_ip((*ip).into(), port),
            Host::Ipv6(ip) => self.is_self_ip((*ip).into(), port),
        }
    }

    /// Whether a parsed URL's host and port designate this server.
    pub fn designates_url(&self, url: &Url) -> bool {
        match (url.host(), url.port_or_known_default()) {
            (Some(h), Some(port)) => self.designates(&h, port),
            _ => false,
        }
    }
}

/// `localhost` and the names under it, which resolve to loopback (RFC 6761 §6.3).
pub fn is_localhost_name(name: &str) -> bool {
    let n = name.trim_end_matches('.');
    n.eq_ignore_ascii_case("localhost")
        || n.len() > ".localhost".len()
            && n[n.len() - ".localhost".len()..].eq_ignore_ascii_case(".localhost")
}

/// Loopback or unspecified, after unwrapping an IPv4-mapped IPv6 address.
fn is_local_ip(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_urls_are_recognised_by_place_and_prefix() {
        let base = Url::parse("http://127.0.0.1:9000/remixd/files/").unwrap();
        let o = ServerOrigin::new("http://127.0.0.1:8080", None)
            .unwrap()
            .with_bucket(base);
        let path = |u: &str| o.bucket_path(&Url::parse(u).unwrap()).map(str::to_string);
        assert_eq!(
            path("http://127.0.0.1:9000/remixd/files/results/t/k/0.png?X-Amz-Signature=ab")
                .as_deref(),
            Some("results/t/k/0.png")
        );
        assert_eq!(
            path("HTTP://127.1:9000/remixd/files/uploads/a%2Fb.png").as_deref(),
            Some("uploads/a%2Fb.png"),
            "any spelling of the same place; the remainder stays encoded"
        );
        for other in [
            "https://127.0.0.1:9000/remixd/files/results/t/k/0.png",
            "http://127.0.0.1:9001/remixd/files/results/t/k/0.png",
            "http://localhost:9000/remixd/files/results/t/k/0.png",
            "http://127.0.0.1:9000/remixd/other/results/t/k/0.png",
            "http://127.0.0.1:9000/remixd/files",
        ] {
            assert_eq!(path(other), None, "{other}");
        }
        let plain = ServerOrigin::new("http://127.0.0.1:8080", None).unwrap();
        assert_eq!(
            plain.bucket_path(&Url::parse("http://127.0.0.1:9000/remixd/files/x").unwrap()),
            None
        );
    }

    fn origin() -> ServerOrigin {
        ServerOrigin::new(
            "https://Remixd.Example.COM.",
            Some("127.0.0.1:8080".parse().unwrap()),
        )
        .unwrap()
    }

    fn designates(o: &ServerOrigin, url: &str) -> bool {
        o.designates_url(&Url::parse(url).unwrap())
    }

    #[test]
    fn every_spelling_of_this_server() {
        let o = origin();
        for url in [
            "http://127.0.0.1:8080/x",
            "HTTP://127.0.0.1:8080/x",
            "http://127.1:8080/x",
            "http://0x7f.1:8080/x",
            "http://2130706433:8080/x",
            "http://127.0.0.1.:8080/x",
            "http://127.9.9.9:8080/x",
            "http://0.0.0.0:8080/x",
            "http://0:8080/x",
            "http://[::1]:8080/x",
            "http://[::]:8080/x",
            "http://[::ffff:127.0.0.1]:8080/x",
            "http://localhost:8080/x",
            "http://LOCALHOST.:8080/x",
            "http://a.localhost:8080/x",
            "https://remixd.example.com/x",
            "https://REMIXD.example.com.:443/x",
            "http://remixd.example.com/x",
            "http://remixd.example.com:8080/x",
            // The public port on a loopback spelling: a local proxy in front of remixd.
            "https://localhost/x",
            "http://127.0.0.1:443/x",
        ] {
            assert!(designates(&o, url), "{url}");
        }
    }

    #[test]
    fn other_servers_are_not_this_one() {
        let o = origin();
        for url in [
            "http://127.0.0.1:9000/x",
            "http://localhost:9000/x",
            "http://127.0.0.1/x",
            "http://remixd.example.com:9000/x",
            "http://other.example.com/x",
            "http://notlocalhost:8080/x",
            "http://localhost.example.com:8080/x",
            "http://10.0.0.1:8080/x",
            "http://[::2]:8080/x",
        ] {
            assert!(!designates(&o, url), "{url}");
        }
    }

    #[test]
    fn listen_and_public_addresses() {
        let o = ServerOrigin::new(
            "http://203.0.113.7:9000",
            Some("0.0.0.0:8080".parse().unwrap()),
        )
        .unwrap();
        assert!(o.is_self_ip("203.0.113.7".parse().unwrap(), 9000));
        assert!(o.is_self_ip("203.0.113.7".parse().unwrap(), 8080));
        assert!(o.is_self_ip("203.0.113.7".parse().unwrap(), 80));
        assert!(o.is_self_ip("::ffff:203.0.113.7".parse().unwrap(), 443));
        assert!(o.is_self_ip("127.0.0.1".parse().unwrap(), 8080));
        assert!(!o.is_self_ip("203.0.113.8".parse().unwrap(), 8080));
        assert!(!o.is_self_ip("127.0.0.1".parse().unwrap(), 80));
        let specific = ServerOrigin::new(
            "http://127.0.0.1:8080",
            Some("192.0.2.4:8080".parse().unwrap()),
        )
        .unwrap();
        assert!(specific.is_self_ip("192.0.2.4".parse().unwrap(), 8080));
        assert!(!specific.is_self_ip("192.0.2.4".parse().unwrap(), 8081));
        assert!(!specific.is_self_ip("192.0.2.5".parse().unwrap(), 8080));
    }

    #[test]
    fn localhost_names() {
        assert!(is_localhost_name("localhost"));
        assert!(is_localhost_name("x.y.LOCALHOST."));
        assert!(!is_localhost_name("xlocalhost"));
        assert!(!is_localhost_name("localhost.com"));
    }
}

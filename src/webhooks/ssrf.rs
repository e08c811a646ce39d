//! Which addresses a webhook endpoint may reach. Endpoint URLs are chosen by API-key owners, and
//! tollgate must not be made to POST into its own network (databases, the broker's management API,
//! cloud metadata services), so only public addresses are reachable unless the operator's allow-list
//! names a range. The check happens twice: when an endpoint is registered (`check_url`, for a clear
//! error) and at every delivery, inside the HTTP client's DNS resolver (`client`), because a name may
//! resolve to a different address by then (DNS rebinding). Addresses given as IP literals never reach
//! a resolver, so deliveries check those with `check_literal`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use url::{Host, Url};

/// The operator's exceptions to "public addresses only".
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    /// From the config's allow-list: CIDRs ("127.0.0.0/8", "::1/128") or bare addresses
    /// ("127.0.0.1" = /32, "::1" = /128). Error names the bad entry.
    pub fn new(allow: &[String]) -> Result<Self, String> {
        let allow = allow
            .iter()
            .map(|entry| {
                let text = entry.trim();
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!(
                            "webhook address allow-list entry {entry:?} is neither a CIDR \
                             (\"10.0.0.0/8\") nor an IP address"
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allow })
    }

    /// None if `ip` may be reached; else why not (a short phrase: "loopback", "private",
    /// "link-local", "cloud metadata", "unspecified", "multicast", "shared address space",
    /// "reserved", "documentation", "benchmarking", ...). An allow-listed address is always
    /// permitted.
    ///
    /// An IPv6 address that carries an IPv4 address (mapped, compatible, NAT64, 6to4) is judged by
    /// that IPv4 address, and is permitted when either form is allow-listed: connecting to it reaches
    /// the IPv4 host.
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        let embedded = match ip {
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
        };
        let allowed = |ip: IpAddr| self.allow.iter().any(|net| net.contains(&ip));
        if allowed(ip) || embedded.is_some_and(allowed) {
            return None;
        }
        match ip {
            IpAddr::V4(v4) => refuses_v4(v4),
            IpAddr::V6(v6) => match embedded_v4(v6) {
                Some(v4) => refuses_v4(v4),
                None => refuses_v6(v6),
            },
        }
    }

    /// Checks an endpoint URL: scheme http or https, a host, no user:password; resolves the host
    /// (tokio::net::lookup_host, port = URL's port or the scheme's default) and refuses it if it
    /// resolves to nothing or if ANY resolved address is refused. Returns the parsed URL.
    pub async fn check_url(&self, url: &str) -> Result<Url, EndpointError> {
        // The url crate parses hosts as browsers do: "127.1", "0x7f000001", "2130706433" and
        // "0177.0.0.1" all become the IPv4 address 127.0.0.1, so no numeric trick reaches DNS.
        let url = Url::parse(url).map_err(|e| EndpointError::BadUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EndpointError::BadUrl(format!(
                "the scheme must be http or https, not {}",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EndpointError::BadUrl(
                "credentials (user:password@) are not allowed in the URL".into(),
            ));
        }
        let host = url
            .host()
            .ok_or_else(|| EndpointError::BadUrl("the URL has no host".into()))?;
        let host_text = url.host_str().unwrap_or_default().to_owned();
        let domain = match host {
            Host::Ipv4(v4) => return self.judge(host_text, IpAddr::V4(v4)).map(|()| url),
            Host::Ipv6(v6) => return self.judge(host_text, IpAddr::V6(v6)).map(|()| url),
            Host::Domain(domain) => domain,
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((domain, port))
            .await
            .map_err(|e| EndpointError::Unresolved {
                host: host_text.clone(),
                error: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(EndpointError::Unresolved {
                host: host_text,
                error: "no addresses".into(),
            });
        }
        for addr in addrs {
            self.judge(host_text.clone(), addr.ip())?;
        }
        Ok(url)
    }

    fn judge(&self, host: String, addr: IpAddr) -> Result<(), EndpointError> {
        match self.refuses(addr) {
            None => Ok(()),
            Some(why) => Err(EndpointError::Refused { host, addr, why }),
        }
    }
}

/// Why an endpoint URL is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("bad endpoint URL: {0}")]
    BadUrl(String),
    #[error("endpoint host {host} is refused: {addr} is not a public address ({why})")]
    Refused {
        host: String,
        addr: IpAddr,
        why: &'static str,
    },
    #[error("endpoint host {host} does not resolve: {error}")]
    Unresolved { host: String, error: String },
}

/// The IPv4 address inside an IPv6 address whose packets end up at that IPv4 host.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    match s {
        // IPv4-mapped ::ffff:a.b.c.d (what a dual-stack socket uses for IPv4 peers).
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => v4(hi, lo),
        // IPv4-translated ::ffff:0:a.b.c.d (SIIT, RFC 7915).
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => v4(hi, lo),
        // :: and ::1 are IPv6's own unspecified and loopback addresses, not IPv4-compatible ones.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        // IPv4-compatible ::a.b.c.d (deprecated, RFC 4291).
        [0, 0, 0, 0, 0, 0, hi, lo] => v4(hi, lo),
        // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052): the gateway forwards to the IPv4 host.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => v4(hi, lo),
        // 6to4 2002:a.b.c.d::/48 (RFC 3056): tunnelled to the IPv4 address.
        [0x2002, hi, lo, ..] => v4(hi, lo),
        _ => None,
    }
}

/// IANA's IPv4 special-purpose registry, minus the few globally reachable anycast entries nobody
/// would run a webhook receiver on.
fn refuses_v4(ip: Ipv4Addr) -> Option<&'static str> {
    Some(match ip.octets() {
        // AWS, GCP, Azure, OpenStack (169.254.169.254), Alibaba (100.100.100.200), Oracle
        // (192.0.0.192): named apart because they hand out credentials.
        [169, 254, 169, 254] | [100, 100, 100, 200] | [192, 0, 0, 192] => "cloud metadata",
        // Connecting to 0.0.0.0 reaches the local host on Linux.
        [0, ..] => "unspecified",
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => "private",
        [100, 64..=127, ..] => "shared address space",
        [127, ..] => "loopback",
        [169, 254, ..] => "link-local",
        [192, 0, 0, _] => "reserved",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation",
        [198, 18..=19, ..] => "benchmarking",
        // The deprecated 6to4 relay anycast (RFC 7526).
        [192, 88, 99, _] => "reserved",
        [224..=239, ..] => "multicast",
        [255, 255, 255, 255] => "broadcast",
        [240..=255, ..] => "reserved",
        _ => return None,
    })
}

/// IPv6 addresses other than those carrying an IPv4 address: only global unicast (2000::/3) minus
/// its special-purpose blocks is reachable.
fn refuses_v6(ip: Ipv6Addr) -> Option<&'static str> {
    Some(match ip.segments() {
        [0, 0, 0, 0, 0, 0, 0, 0] => "unspecified",
        [0, 0, 0, 0, 0, 0, 0, 1] => "loopback",
        // AWS's instance metadata service over IPv6.
        [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] => "cloud metadata",
        // Local-use NAT64 64:ff9b:1::/48 (RFC 8215): translates to the operator's own IPv4 space.
        [0x64, 0xff9b, 1, ..] => "private",
        [0x100, 0, 0, 0, ..] => "discard",
        [0x2001, 2, 0, ..] => "benchmarking",
        // IETF protocol assignments 2001::/23, Teredo 2001::/32 among them.
        [0x2001, 0..=0x1ff, ..] => "reserved",
        [0x2001, 0xdb8, ..] | [0x3fff, 0..=0xfff, ..] => "documentation",
        [0xfc00..=0xfdff, ..] => "private",
        [0xfe80..=0xfebf, ..] => "link-local",
        // Site-local fec0::/10, deprecated (RFC 3879) but still routed inside some networks.
        [0xfec0..=0xfeff, ..] => "private",
        [0xff00..=0xffff, ..] => "multicast",
        [0x2000..=0x3fff, ..] => return None,
        _ => "reserved",
    })
}

/// A reqwest DNS resolver that drops refused addresses (so a name that re-resolves to a private
/// address at delivery time — DNS rebinding — cannot be reached), failing when none is left.
pub struct GuardedResolver {
    policy: AddressPolicy,
}

impl GuardedResolver {
    pub fn new(policy: AddressPolicy) -> Self {
        Self { policy }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // Port 0: reqwest puts in the URL's port or the scheme's default.
            let resolved = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| EndpointError::Unresolved {
                    host: host.clone(),
                    error: e.to_string(),
                })?;
            let mut first_refusal = None;
            let kept: Vec<SocketAddr> = resolved
                .filter(|addr| match policy.refuses(addr.ip()) {
                    None => true,
                    Some(why) => {
                        first_refusal.get_or_insert((addr.ip(), why));
                        false
                    }
                })
                .collect();
            if kept.is_empty() {
                let error = match first_refusal {
                    Some((addr, why)) => EndpointError::Refused { host, addr, why },
                    None => EndpointError::Unresolved {
                        host,
                        error: "no addresses".into(),
                    },
                };
                return Err(error.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// A reqwest client for deliveries: the guarded resolver, no redirects followed (a 3xx is an answer,
/// not a hop: a redirect could point anywhere), the given timeout, no proxy from the environment.
pub fn client(policy: &AddressPolicy, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver::new(policy.clone())))
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve the name itself, out of the resolver's reach.
        .no_proxy()
        .timeout(timeout)
        .build()
        // Only fails when the TLS backend cannot start, as `reqwest::Client::new` assumes too.
        .expect("the webhook HTTP client could not be built")
}

/// Refuses a URL whose host is an IP literal the policy refuses (reqwest does not call the resolver
/// for IP literals, so the delivery path checks them with this).
pub fn check_literal(policy: &AddressPolicy, url: &Url) -> Result<(), EndpointError> {
    let addr = match url.host() {
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(Host::Domain(_)) | None => return Ok(()),
    };
    policy.judge(url.host_str().unwrap_or_default().to_owned(), addr)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn why(ip: &str) -> Option<&'static str> {
        AddressPolicy::default().refuses(ip.parse().unwrap())
    }

    fn policy(allow: &[&str]) -> AddressPolicy {
        AddressPolicy::new(&allow.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn ipv4_classes() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("10.0.0.1", "private"),
            ("10.255.255.255", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.0.1", "link-local"),
            ("169.254.169.254", "cloud metadata"),
            ("100.100.100.200", "cloud metadata"),
            ("192.0.0.192", "cloud metadata"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("100.64.0.1", "shared address space"),
            ("100.127.255.255", "shared address space"),
            ("192.0.0.8", "reserved"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.254", "reserved"),
            ("255.255.255.255", "broadcast"),
            ("192.88.99.1", "reserved"),
        ];
        for (ip, expected) in cases {
            assert_eq!(why(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn public_ipv4_passes_including_neighbours_of_private_ranges() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "192.0.1.1",
            "192.0.3.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
        ] {
            assert_eq!(why(ip), None, "{ip}");
        }
    }

    #[test]
    fn ipv6_classes() {
        let cases = [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("fc00::1", "private"),
            ("fd12:3456::1", "private"),
            ("fd00:ec2::254", "cloud metadata"),
            ("fec0::1", "private"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("2001:2::1", "benchmarking"),
            ("2001::1", "reserved"),
            ("100::1", "discard"),
            ("64:ff9b:1::a00:1", "private"),
            ("4000::1", "reserved"),
            ("5f00::1", "reserved"),
        ];
        for (ip, expected) in cases {
            assert_eq!(why(ip), Some(expected), "{ip}");
        }
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "2001:4860::1",
        ] {
            assert_eq!(why(ip), None, "{ip}");
        }
    }

    #[test]
    fn ipv6_carrying_ipv4_is_judged_by_the_ipv4_address() {
        let cases = [
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.1.2.3", Some("private")),
            ("::ffff:169.254.169.254", Some("cloud metadata")),
            ("::ffff:0.0.0.0", Some("unspecified")),
            ("::ffff:8.8.8.8", None),
            ("::ffff:0:127.0.0.1", Some("loopback")),
            ("::ffff:0:8.8.8.8", None),
            ("::127.0.0.1", Some("loopback")),
            ("::192.168.0.1", Some("private")),
            ("::8.8.8.8", None),
            ("64:ff9b::127.0.0.1", Some("loopback")),
            ("64:ff9b::10.0.0.1", Some("private")),
            ("64:ff9b::169.254.169.254", Some("cloud metadata")),
            ("64:ff9b::8.8.8.8", None),
            ("2002:7f00:1::1", Some("loopback")),
            ("2002:c0a8:101::1", Some("private")),
            ("2002:808:808::1", None),
        ];
        for (ip, expected) in cases {
            assert_eq!(why(ip), expected, "{ip}");
        }
    }

    #[test]
    fn allow_list_permits_its_ranges_only() {
        let allow = policy(&["127.0.0.0/8", "::1", "10.1.2.3", " fd00::/8 "]);
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "10.1.2.3",
            "fd00::5",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(allow.refuses(ip.parse().unwrap()), None, "{ip}");
        }
        for (ip, expected) in [
            ("10.1.2.4", "private"),
            ("192.168.0.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("fc00::1", "private"),
            ("fe80::1", "link-local"),
        ] {
            assert_eq!(allow.refuses(ip.parse().unwrap()), Some(expected), "{ip}");
        }
        // An allowed mapped address permits its IPv4 form too: both reach the same host.
        let mapped = policy(&["::ffff:192.168.0.0/112"]);
        assert_eq!(
            mapped.refuses("192.168.0.9".parse().unwrap()),
            Some("private")
        );
        assert_eq!(mapped.refuses("::ffff:192.168.0.9".parse().unwrap()), None);
    }

    #[test]
    fn allow_list_names_the_bad_entry() {
        let err = AddressPolicy::new(&["10.0.0.0/8".into(), "localhost".into()]).unwrap_err();
        assert!(err.contains("\"localhost\""), "{err}");
        let err = AddressPolicy::new(&["10.0.0.0/33".into()]).unwrap_err();
        assert!(err.contains("\"10.0.0.0/33\""), "{err}");
        assert!(AddressPolicy::new(&[]).is_ok());
    }

    #[tokio::test]
    async fn url_hosts_in_disguise_are_refused() {
        let policy = AddressPolicy::default();
        let cases = [
            ("http://localhost/hook", "loopback"),
            ("http://localhost:8080/hook", "loopback"),
            ("http://127.0.0.1/", "loopback"),
            ("http://127.1/", "loopback"),
            ("http://0x7f000001/", "loopback"),
            ("http://2130706433/", "loopback"),
            ("http://0177.0.0.1/", "loopback"),
            ("http://127.0.0.1./", "loopback"),
            ("https://[::1]/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "loopback"),
            ("http://[::ffff:7f00:1]/", "loopback"),
            ("http://0/", "unspecified"),
            ("http://[::]/", "unspecified"),
            ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
            ("http://[fd00:ec2::254]/", "cloud metadata"),
            ("http://10.0.0.1:5432/", "private"),
            ("http://[64:ff9b::a00:1]/", "private"),
        ];
        for (url, expected) in cases {
            match policy.check_url(url).await {
                Err(EndpointError::Refused { why, .. }) => assert_eq!(why, expected, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn url_shape_is_checked() {
        let policy = AddressPolicy::default();
        for url in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "gopher://127.0.0.1/",
            "http://user:pass@8.8.8.8/",
            "http://user@8.8.8.8/",
            "https://:pass@8.8.8.8/",
            "not a url",
            "http://",
            "unix:/var/run/docker.sock",
        ] {
            assert!(
                matches!(policy.check_url(url).await, Err(EndpointError::BadUrl(_))),
                "{url}"
            );
        }
        // IP literals need no DNS, so a public one is accepted as is.
        let url = policy
            .check_url("https://8.8.8.8:8443/hook?x=1")
            .await
            .unwrap();
        assert_eq!(url.as_str(), "https://8.8.8.8:8443/hook?x=1");
    }

    #[tokio::test]
    async fn unresolvable_name_is_refused() {
        // .invalid never resolves (RFC 6761).
        let err = AddressPolicy::default()
            .check_url("https://no-such-host.invalid/hook")
            .await
            .unwrap_err();
        assert!(
            matches!(&err, EndpointError::Unresolved { host, .. } if host == "no-such-host.invalid"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn allow_list_lets_local_urls_through() {
        let policy = policy(&["127.0.0.0/8", "::1/128"]);
        policy
            .check_url("http://localhost:8080/hook")
            .await
            .unwrap();
        policy.check_url("http://127.1/").await.unwrap();
        policy.check_url("http://[::1]/").await.unwrap();
    }

    #[test]
    fn literal_check_sees_ip_hosts_only() {
        let policy = AddressPolicy::default();
        let check = |url: &str| check_literal(&policy, &Url::parse(url).unwrap());
        assert!(matches!(
            check("http://127.1/"),
            Err(EndpointError::Refused {
                why: "loopback",
                ..
            })
        ));
        assert!(matches!(
            check("http://[::ffff:10.0.0.1]/"),
            Err(EndpointError::Refused { why: "private", .. })
        ));
        assert!(check("http://8.8.8.8/").is_ok());
        // Names are the resolver's business.
        assert!(check("http://localhost/").is_ok());
    }

    /// A listener on 127.0.0.1 answering every connection with an empty 200, counting connections.
    async fn tiny_server() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        (port, connections)
    }

    #[tokio::test]
    async fn client_does_not_reach_localhost_unless_allowed() {
        let (port, connections) = tiny_server().await;
        let url = format!("http://localhost:{port}/hook");

        let guarded = client(&AddressPolicy::default(), Duration::from_secs(5));
        let err = guarded.post(&url).body("{}").send().await.unwrap_err();
        let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(": ");
        assert!(
            chain.contains("is not a public address (loopback)"),
            "{chain}"
        );
        assert_eq!(connections.load(Ordering::SeqCst), 0);

        let allowed = client(&policy(&["127.0.0.0/8"]), Duration::from_secs(5));
        let response = allowed.post(&url).body("{}").send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn client_does_not_follow_redirects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://169.254.169.254/\r\n\
                      content-length: 0\r\n\r\n",
                )
                .await;
        });
        let allowed = client(&policy(&["127.0.0.0/8"]), Duration::from_secs(5));
        let response = allowed
            .post(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 307);
    }
}

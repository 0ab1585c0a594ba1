//! Where webhooks may go: a `callback_url` is checked when a report is submitted and again when
//! its webhook is delivered, so a caller cannot aim the system's POSTs (and the signed report)
//! at an internal address.
//!
//! A target must be an `http(s)` URL (parsed by the WHATWG rules of the `url` crate, so
//! `http://2130706433/`, `http://0x7f.1/` and `http://0177.0.0.1/` are all the loopback address
//! they spell) without user info, whose host resolves only to public addresses: not loopback,
//! private, shared (CGNAT), link-local, unique-local, multicast, unspecified, broadcast,
//! documentation or otherwise reserved ranges, nor an IPv6 address that embeds such an IPv4
//! address (mapped, compatible, NAT64, 6to4). At delivery the HTTP client connects only to
//! addresses that pass the same check, from the same lookup ([`WebhookTargets::resolver`]): a
//! DNS answer that changes between the check and the connection (rebinding) cannot reach an
//! internal address. Redirects are not followed (see the deliverer).
//!
//! Operators who do run receivers on internal addresses list them in `webhooks.allow_hosts`:
//! host names (exact) or addresses and CIDR ranges (`10.1.0.0/16`, `127.0.0.1`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use std::time::Duration;

use ipnet::IpNet;
use url::{Host, Url};

/// The form a `callback_url` must have, the same as the API schema's `pattern`: http(s), a host
/// name (its last label starting with a letter) or a dotted IPv4 address, an optional port, an
/// optional path and query of printable ASCII. Everything it matches, the URL parser takes.
pub const CALLBACK_URL_PATTERN: &str = concat!(
    r"^https?://",
    r"((([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)",
    r"|((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]))",
    r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?",
    r"([/?][!-~]*)?$"
);

static CALLBACK_URL: std::sync::LazyLock<regex::Regex> =
    std::sync::LazyLock::new(|| regex::Regex::new(CALLBACK_URL_PATTERN).expect("a valid pattern"));

/// How long a submit waits for the callback host's addresses.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a `callback_url` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("`{0}` is not a valid URL")]
    Malformed(String),
    #[error("only http:// and https:// URLs are allowed")]
    Scheme,
    #[error("user names and passwords in the URL are not allowed")]
    UserInfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("`{host}` does not resolve")]
    Unresolved { host: String },
    #[error("`{host}` is an internal address ({addr}); webhooks go to public addresses only")]
    Internal { host: String, addr: IpAddr },
}

/// The webhook target policy: public addresses, plus what the operator allows.
#[derive(Debug, Clone, Default)]
pub struct WebhookTargets {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

impl WebhookTargets {
    /// The policy with `allow` (host names, addresses or CIDR ranges) reachable besides public
    /// addresses. An entry that is none of those is an error naming it.
    pub fn new(allow: &[String]) -> Result<Self, String> {
        let mut targets = Self::default();
        for entry in allow {
            let entry = entry.trim();
            if let Ok(net) = entry.parse::<IpNet>() {
                targets.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                targets.nets.push(IpNet::from(ip));
            } else if is_host_name(entry.trim_end_matches('.')) {
                targets
                    .hosts
                    .push(entry.trim_end_matches('.').to_ascii_lowercase());
            } else {
                return Err(format!(
                    "`{entry}` is not a host name, an IP address or a CIDR range"
                ));
            }
        }
        Ok(targets)
    }

    /// Checks the URL's form (not its addresses): http(s), a host, no user info.
    pub fn parse(&self, raw: &str) -> Result<Url, TargetError> {
        // As the API schema says: the scheme in lower case, nothing before it.
        let Some(rest) = raw
            .strip_prefix("http://")
            .or_else(|| raw.strip_prefix("https://"))
        else {
            return Err(TargetError::Scheme);
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(TargetError::UserInfo);
        }
        if !CALLBACK_URL.is_match(raw) {
            return Err(TargetError::Malformed(raw.to_owned()));
        }
        let url = Url::parse(raw).map_err(|_| TargetError::Malformed(raw.to_owned()))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(TargetError::UserInfo);
        }
        if url.host().is_none() {
            return Err(TargetError::NoHost);
        }
        Ok(url)
    }

    /// Parses `raw` and checks every address its host resolves to.
    pub async fn check(&self, raw: &str) -> Result<Url, TargetError> {
        let url = self.parse(raw)?;
        let host = host_text(&url);
        match url.host() {
            Some(Host::Ipv4(ip)) => self.check_addr(&host, IpAddr::V4(ip))?,
            Some(Host::Ipv6(ip)) => self.check_addr(&host, IpAddr::V6(ip))?,
            Some(Host::Domain(name)) => {
                let port = url.port_or_known_default().unwrap_or(80);
                // A name that does not resolve now is taken: its addresses are checked when the
                // webhook is delivered, and only those that pass are connected to.
                let lookup = tokio::net::lookup_host((name, port));
                let addrs: Vec<SocketAddr> =
                    match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
                        Ok(Ok(addrs)) => addrs.collect(),
                        _ => Vec::new(),
                    };
                for a in addrs {
                    self.check_addr(&host, a.ip())?;
                }
            }
            None => return Err(TargetError::NoHost),
        }
        Ok(url)
    }

    /// Whether `host` may be reached at `addr`.
    pub fn check_addr(&self, host: &str, addr: IpAddr) -> Result<(), TargetError> {
        let host = host.trim_end_matches('.');
        let host_allowed = self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host));
        if host_allowed || self.nets.iter().any(|n| n.contains(&addr)) || is_public(addr) {
            Ok(())
        } else {
            Err(TargetError::Internal {
                host: host.to_owned(),
                addr,
            })
        }
    }

    /// A DNS resolver for the delivering HTTP client that hands out only the addresses this
    /// policy allows (connecting to what was checked, in one lookup).
    pub fn resolver(self: &Arc<Self>) -> Arc<CheckedResolver> {
        Arc::new(CheckedResolver {
            targets: self.clone(),
        })
    }
}

/// See [`WebhookTargets::resolver`].
#[derive(Debug)]
pub struct CheckedResolver {
    targets: Arc<WebhookTargets>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let targets = self.targets.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| targets.check_addr(&host, a.ip()).is_ok())
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(TargetError::Internal {
                    host: host.clone(),
                    addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The URL's host as written in it (IPv6 without brackets).
pub fn host_text(url: &Url) -> String {
    match url.host() {
        Some(Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => String::new(),
    }
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// An address on the public internet: none of the special-purpose ranges (RFC 6890 and its
/// updates), and no IPv6 form of a non-public IPv4 address.
pub fn is_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => is_public_v6(ip),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network", 0.0.0.0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 169 && b == 254) // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // documentation
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || (a == 192 && b == 168)
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100) // documentation
        || (a == 203 && b == 0 && c == 113) // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if s[..5] == [0; 5] && s[5] == 0xffff || s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        // IPv4-mapped (::ffff:a.b.c.d) or IPv4-translated (::ffff:0:a.b.c.d): what it maps to
        // decides.
        return is_public_v4(v4_of(s[6], s[7]));
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001 {
        // Local-use NAT64 (64:ff9b:1::/48): where it leads is the operator's business.
        return false;
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        // NAT64: the IPv4 address it reaches decides.
        return is_public_v4(v4_of(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        // 6to4: the IPv4 address it tunnels to decides.
        return is_public_v4(v4_of(s[1], s[2]));
    }
    !(s[..6] == [0; 6] // unspecified, loopback, IPv4-compatible (deprecated)
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] & 0xff00) == 0xff00 // multicast
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] < 0x0200) // IETF protocol assignments (Teredo, ORCHID, …)
        || (s[0] == 0x0100 && s[1..4] == [0; 3])) // discard-only
}

fn v4_of(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_spelling_of_an_internal_address_is_refused() {
        let t = WebhookTargets::default();
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://017700000001/",
            "http://localhost:6379/",
            "http://LOCALHOST/",
            "http://0.0.0.0/",
            "http://0/",
            "http://[::1]/",
            "http://[::]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:7f00:1::]/",
            "http://[::ffff:0:7f00:1]/",
            "http://[64:ff9b:1::a00:1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://10.0.0.1/",
            "http://172.16.5.4/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "https://[ff02::1]/",
        ] {
            let err = t.check(url).await.expect_err(url);
            assert!(
                matches!(
                    err,
                    TargetError::Internal { .. } | TargetError::Malformed(_)
                ),
                "{url}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn malformed_urls_user_info_and_other_schemes_are_refused() {
        let t = WebhookTargets::default();
        assert_eq!(
            t.parse("http://exa mple.com/").unwrap_err(),
            TargetError::Malformed("http://exa mple.com/".into())
        );
        assert_eq!(
            t.parse("ftp://example.com/").unwrap_err(),
            TargetError::Scheme
        );
        assert_eq!(
            t.parse("file:///etc/passwd").unwrap_err(),
            TargetError::Scheme
        );
        assert_eq!(
            t.parse("http://user:pass@example.com/").unwrap_err(),
            TargetError::UserInfo
        );
        assert_eq!(
            t.parse("http://user@example.com/").unwrap_err(),
            TargetError::UserInfo
        );
        assert!(t.parse("not a url").is_err());
        assert_eq!(
            t.parse(" http://example.com/").unwrap_err(),
            TargetError::Scheme
        );
        assert!(t.parse("https://example.com/hook?x=1").is_ok());
    }

    #[tokio::test]
    async fn public_addresses_pass_and_the_allow_list_opens_internal_ones() {
        let t = WebhookTargets::default();
        assert!(t.check("https://93.184.215.14/hook").await.is_ok());
        // A name that does not resolve now is checked at delivery.
        assert!(
            t.check("http://does-not-resolve.invalid/hook")
                .await
                .is_ok()
        );
        let allowed = WebhookTargets::new(&[
            "127.0.0.1".into(),
            "10.1.0.0/16".into(),
            "hooks.internal".into(),
        ])
        .unwrap();
        assert!(allowed.check("http://127.0.0.1:9000/").await.is_ok());
        assert!(allowed.check("http://10.1.2.3/").await.is_ok());
        assert!(allowed.check("http://10.2.0.1/").await.is_err());
        assert!(
            allowed
                .check_addr("hooks.internal", "10.9.9.9".parse().unwrap())
                .is_ok()
        );
        assert!(WebhookTargets::new(&["not/a host".into()]).is_err());
    }
}

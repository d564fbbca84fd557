//! Text forms of the HBONE request: the `:authority` (the target) and the `forwarded` header (the
//! original client address).
use std::net::{IpAddr, SocketAddr};

/// The `forwarded` request header (RFC 7239) carrying the original client address.
pub const FORWARDED: &str = "forwarded";

/// `ip:port`, IPv6 as `[addr]:port`. Scope ids and flow info are left out: they only mean something on
/// the sending host, and ztunnel sends none.
pub fn format_authority(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

/// `for="ip:port"`; the quotes are required by RFC 7239 for IPv6 and used by ztunnel for both.
pub fn format_forwarded(client: SocketAddr) -> String {
    format!("for=\"{}\"", format_authority(client))
}

/// Why an `:authority` is not an HBONE target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("missing :authority")]
    Missing,
    #[error("authority {0:?} is not an IP address with a port")]
    NotSocketAddr(String),
    #[error("authority {0:?} has port 0")]
    PortZero(String),
}

/// Parses an `:authority` as the IP literal and port HBONE requires (no host names).
pub fn parse_authority(authority: Option<&str>) -> Result<SocketAddr, AuthorityError> {
    let text = authority.ok_or(AuthorityError::Missing)?;
    if text.is_empty() {
        return Err(AuthorityError::Missing);
    }
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| AuthorityError::NotSocketAddr(text.to_owned()))?;
    if addr.port() == 0 {
        return Err(AuthorityError::PortZero(text.to_owned()));
    }
    Ok(addr)
}

/// The client address of a `forwarded` header: the `for` parameter of the first element (the original
/// client; proxies append theirs). `None` when absent or not an `ip:port` — the header is informational
/// and a malformed one does not make the request bad.
pub fn parse_forwarded(value: &str) -> Option<SocketAddr> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, val) = pair.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let val = val.trim();
        let val = val
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(val);
        val.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|e| panic!("test address {s}: {e}"))
    }

    #[test]
    fn authority_formats() {
        assert_eq!(format_authority(sa("10.10.1.2:7001")), "10.10.1.2:7001");
        assert_eq!(format_authority(sa("[fd00::1]:80")), "[fd00::1]:80");
        assert_eq!(format_authority(sa("[fe80::1%3]:80")), "[fe80::1]:80");
    }

    #[test]
    fn forwarded_formats() {
        assert_eq!(
            format_forwarded(sa("10.10.1.1:56612")),
            "for=\"10.10.1.1:56612\""
        );
        assert_eq!(
            format_forwarded(sa("[fd00::2]:1234")),
            "for=\"[fd00::2]:1234\""
        );
    }

    #[test]
    fn authority_parses_ip_and_port_only() {
        assert_eq!(parse_authority(Some("10.0.0.1:80")), Ok(sa("10.0.0.1:80")));
        assert_eq!(parse_authority(Some("[::1]:8080")), Ok(sa("[::1]:8080")));
        assert_eq!(parse_authority(None), Err(AuthorityError::Missing));
        assert_eq!(parse_authority(Some("")), Err(AuthorityError::Missing));
        for bad in [
            "10.0.0.1",
            "example.com:80",
            "::1:80",
            "10.0.0.1:x",
            "10.0.0.1:99999",
        ] {
            assert_eq!(
                parse_authority(Some(bad)),
                Err(AuthorityError::NotSocketAddr(bad.to_owned())),
                "{bad}"
            );
        }
        assert_eq!(
            parse_authority(Some("10.0.0.1:0")),
            Err(AuthorityError::PortZero("10.0.0.1:0".to_owned()))
        );
    }

    #[test]
    fn forwarded_parses_first_for() {
        assert_eq!(
            parse_forwarded("for=\"10.10.1.1:56612\""),
            Some(sa("10.10.1.1:56612"))
        );
        assert_eq!(
            parse_forwarded("for=\"[fd00::2]:1234\""),
            Some(sa("[fd00::2]:1234"))
        );
        assert_eq!(
            parse_forwarded("proto=https; For=10.0.0.9:1, for=\"10.0.0.8:2\""),
            Some(sa("10.0.0.9:1"))
        );
        assert_eq!(parse_forwarded("for=unknown"), None);
        assert_eq!(parse_forwarded("for=\"10.0.0.1\""), None);
        assert_eq!(parse_forwarded(""), None);
        assert_eq!(parse_forwarded("by=\"10.0.0.1:1\""), None);
    }
}

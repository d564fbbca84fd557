//! Arbitrary request heads into the HBONE server's CONNECT validation (what a peer's HEADERS carry
//! once h2 has decoded them): it must accept or refuse, never panic, and anything it accepts must be a
//! usable target. Input: lines `method`, `uri`, then `name: value` headers; the first byte's low bit
//! chooses whether the connection's local address is known. Seeds: `agent/fuzz/seeds/hbone_request/`.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use ferry::tunnel::validate_connect;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 2, 20));

fuzz_target!(|data: &[u8]| {
    let expected = data.first().is_some_and(|b| b & 1 == 1).then_some(LOCAL);
    let mut lines = data.get(1..).unwrap_or_default().split(|b| *b == b'\n');
    // h2 only hands over heads whose method, URI and headers parse; the rest never reach validation.
    let Ok(method) = Method::from_bytes(lines.next().unwrap_or_default()) else {
        return;
    };
    let Ok(uri) = Uri::try_from(lines.next().unwrap_or_default()) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value.trim_ascii()),
        ) {
            headers.append(n, v);
        }
    }
    match validate_connect(&method, &uri, &headers, expected) {
        Ok(req) => {
            assert_eq!(method, Method::CONNECT);
            assert_ne!(req.target.port(), 0, "accepted port 0");
            if let Some(local) = expected {
                assert_eq!(req.target.ip().to_canonical(), local, "accepted another IP");
            }
            if let Some(f) = req.forwarded_for {
                let _ = f.to_string();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

//! The test world's application: a server and clients that report what they see, as JSON.
//!
//! - `serve --listen ADDR[,ADDR...] [--ports A-B] --tag T`: accepts on every address; for each
//!   connection writes `T peer=<peer> local=<local>\n`, then echoes until EOF and closes its write side.
//!   Prints `listening` once bound and `accepted <peer> <local>` per connection. With
//!   `--send-first N [--pause-ms M]` it instead sends N bytes and half-closes first, then reads.
//! - `dial --to ADDR --send TEXT --timeout-ms N`: connects, reports `getpeername()`/`getsockname()`,
//!   reads the greeting line, sends TEXT, half-closes, reads the echo to EOF.
//! - `dial-many --to ADDR[,ADDR...] --timeout-ms N`: dials every address concurrently (one thread
//!   each) and prints one JSON object per line, as `dial` does.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args),
        Some("dial") => {
            let to = parse_addr(&arg(&args, "--to").unwrap_or_default());
            let send = arg(&args, "--send").unwrap_or_default();
            println!("{}", dial(to, &send, timeout(&args)));
        }
        Some("dial-bulk") => {
            let to = parse_addr(&arg(&args, "--to").unwrap_or_default());
            let bytes: usize = arg(&args, "--bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let expect: Option<usize> = arg(&args, "--expect").and_then(|v| v.parse().ok());
            println!("{}", dial_bulk(to, bytes, expect, timeout(&args)));
        }
        Some("hold") => {
            let to = parse_addr(&arg(&args, "--to").unwrap_or_default());
            let secs: u64 = arg(&args, "--seconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(10);
            let pause: u64 = arg(&args, "--pause-ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(50);
            println!(
                "{}",
                hold(to, Duration::from_secs(secs), Duration::from_millis(pause))
            );
        }
        Some("dial-many") => {
            let targets: Vec<SocketAddr> = arg(&args, "--to")
                .unwrap_or_default()
                .split(',')
                .map(parse_addr)
                .collect();
            let t = timeout(&args);
            let handles: Vec<_> = targets
                .into_iter()
                .map(|to| std::thread::spawn(move || dial(to, "x", t)))
                .collect();
            for h in handles {
                println!(
                    "{}",
                    h.join()
                        .unwrap_or_else(|_| "{\"ok\":false,\"error\":\"panic\"}".into())
                );
            }
        }
        _ => {
            eprintln!("usage: ferry-testapp serve|dial|dial-many ...");
            std::process::exit(2);
        }
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| {
        eprintln!("bad address {s:?}: {e}");
        std::process::exit(2)
    })
}

fn timeout(args: &[String]) -> Duration {
    Duration::from_millis(
        arg(args, "--timeout-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000),
    )
}

fn serve(args: &[String]) {
    let tag = arg(args, "--tag").unwrap_or_else(|| "app".into());
    let mut addrs: Vec<SocketAddr> = arg(args, "--listen")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(parse_addr)
        .collect();
    if let Some(range) = arg(args, "--ports") {
        let (a, b) = range.split_once('-').unwrap_or((&range, &range));
        let (a, b): (u16, u16) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
        let ip = arg(args, "--ip").unwrap_or_else(|| "0.0.0.0".into());
        for p in a..=b {
            addrs.push(parse_addr(&format!("{ip}:{p}")));
        }
    }
    let mut threads = Vec::new();
    for addr in addrs {
        let listener = match bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        let tag = tag.clone();
        let first: Option<usize> = arg(args, "--send-first").and_then(|v| v.parse().ok());
        let pause = Duration::from_millis(
            arg(args, "--pause-ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        );
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let tag = tag.clone();
                std::thread::spawn(move || match first {
                    Some(n) => handle_send_first(conn, &tag, n, pause),
                    None => handle(conn, &tag),
                });
            }
        }));
    }
    println!("listening");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // std's bind does not let an IPv6 wildcard coexist with the IPv4 one; set IPV6_V6ONLY by hand.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            4,
        );
        if addr.is_ipv6() {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&one as *const libc::c_int).cast(),
                4,
            );
        }
    }
    use std::os::fd::FromRawFd;
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let sa: socket_addr::Raw = socket_addr::Raw::from(addr);
    let rc = unsafe { libc::bind(fd, sa.ptr(), sa.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if unsafe { libc::listen(fd, 4096) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

mod socket_addr {
    use std::net::SocketAddr;

    pub enum Raw {
        V4(libc::sockaddr_in),
        V6(libc::sockaddr_in6),
    }

    impl From<SocketAddr> for Raw {
        fn from(a: SocketAddr) -> Self {
            match a {
                SocketAddr::V4(a) => Raw::V4(libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                }),
                SocketAddr::V6(a) => Raw::V6(libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                }),
            }
        }
    }

    impl Raw {
        pub fn ptr(&self) -> *const libc::sockaddr {
            match self {
                Raw::V4(a) => (a as *const libc::sockaddr_in).cast(),
                Raw::V6(a) => (a as *const libc::sockaddr_in6).cast(),
            }
        }
        pub fn len(&self) -> libc::socklen_t {
            match self {
                Raw::V4(_) => std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                Raw::V6(_) => std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            }
        }
    }
}

fn handle(mut conn: TcpStream, tag: &str) {
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("accepted {peer} {local}");
    let _ = std::io::stdout().flush();
    if conn
        .write_all(format!("{tag} peer={peer} local={local}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// The byte at offset `i` of every bulk transfer: a pattern that catches reordering and loss.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}

fn write_pattern(w: &mut impl Write, n: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < n {
        let len = buf.len().min(n - off);
        for (j, b) in buf[..len].iter_mut().enumerate() {
            *b = pattern(off + j);
        }
        w.write_all(&buf[..len])?;
        off += len;
    }
    Ok(())
}

/// Reads to EOF; returns (count, whether every byte matched the pattern).
fn read_pattern(r: &mut impl Read) -> std::io::Result<(usize, bool)> {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut n, mut intact) = (0usize, true);
    loop {
        let got = r.read(&mut buf)?;
        if got == 0 {
            return Ok((n, intact));
        }
        intact &= buf[..got]
            .iter()
            .enumerate()
            .all(|(j, b)| *b == pattern(n + j));
        n += got;
    }
}

/// Server half-closes first: greeting, `n` pattern bytes, FIN; then reads the client's bytes to EOF.
/// `pause` passes before the pattern and again before the FIN, so that a relay that changes how it
/// carries a connection after a while (the same-node fast path) has done so before either.
fn handle_send_first(mut conn: TcpStream, tag: &str, n: usize, pause: Duration) {
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("accepted {peer} {local}");
    if conn
        .write_all(format!("{tag} peer={peer} local={local}\n").as_bytes())
        .is_err()
        || {
            std::thread::sleep(pause);
            write_pattern(&mut conn, n).is_err()
        }
        || {
            std::thread::sleep(pause);
            conn.shutdown(Shutdown::Write).is_err()
        }
    {
        println!("send-first failed");
        return;
    }
    match read_pattern(&mut conn) {
        Ok((got, intact)) => println!("got {got} intact={intact}"),
        Err(e) => println!("read failed: {e}"),
    }
    let _ = std::io::stdout().flush();
}

/// Client of a bulk transfer. Without `expect`: sends `bytes`, half-closes, reads the echo to EOF.
/// With `expect`: reads the server's `expect` bytes to EOF first, then sends `bytes` and half-closes.
fn dial_bulk(to: SocketAddr, bytes: usize, expect: Option<usize>, timeout: Duration) -> String {
    let fail = |e: &dyn std::fmt::Display| {
        format!("{{\"ok\":false,\"error\":{}}}", json_str(&e.to_string()))
    };
    let conn = match TcpStream::connect_timeout(&to, timeout) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let mut reader = BufReader::with_capacity(
        64 * 1024,
        match conn.try_clone() {
            Ok(c) => c,
            Err(e) => return fail(&e),
        },
    );
    let mut greeting = String::new();
    if let Err(e) = reader.read_line(&mut greeting) {
        return fail(&e);
    }
    let mut w = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let (received, intact) = if let Some(expect) = expect {
        let r = match read_pattern(&mut reader) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        if let Err(e) = write_pattern(&mut w, bytes).and_then(|_| w.shutdown(Shutdown::Write)) {
            return fail(&e);
        }
        (r.0, r.1 && r.0 == expect)
    } else {
        let writer = std::thread::spawn(move || {
            write_pattern(&mut w, bytes).and_then(|_| w.shutdown(Shutdown::Write))
        });
        let r = match read_pattern(&mut reader) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        match writer.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return fail(&e),
            Err(_) => return fail(&"writer panicked"),
        }
        (r.0, r.1 && r.0 == bytes)
    };
    format!(
        "{{\"ok\":true,\"received\":{received},\"intact\":{intact},\"greeting\":{}}}",
        json_str(greeting.trim_end())
    )
}

/// A long-lived connection: one byte every 50 ms, each echo awaited, for `len` or until it breaks.
/// Prints `connected` once the greeting arrived, then one JSON line at the end.
fn hold(to: SocketAddr, len: Duration, pause: Duration) -> String {
    let start = std::time::Instant::now();
    let fail = |e: &dyn std::fmt::Display| {
        format!(
            "{{\"ok\":false,\"error\":{},\"after_ms\":{}}}",
            json_str(&e.to_string()),
            start.elapsed().as_millis()
        )
    };
    let conn = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    });
    let mut greeting = String::new();
    if let Err(e) = reader.read_line(&mut greeting) {
        return fail(&e);
    }
    println!("connected");
    let _ = std::io::stdout().flush();
    let mut w = &conn;
    let mut rounds = 0u64;
    while start.elapsed() < len {
        if let Err(e) = w.write_all(b"x") {
            return fail(&e);
        }
        let mut b = [0u8; 1];
        match reader.read(&mut b) {
            Ok(1) if b[0] == b'x' => rounds += 1,
            Ok(0) => return fail(&"EOF"),
            Ok(_) => return fail(&"wrong byte"),
            Err(e) => return fail(&e),
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
    format!(
        "{{\"ok\":true,\"rounds\":{rounds},\"after_ms\":{}}}",
        start.elapsed().as_millis()
    )
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn dial(to: SocketAddr, send: &str, timeout: Duration) -> String {
    let fail = |e: &dyn std::fmt::Display| {
        format!("{{\"ok\":false,\"error\":{}}}", json_str(&e.to_string()))
    };
    let conn = match TcpStream::connect_timeout(&to, timeout) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    // Right after connect: a reset that follows (the agent refusing) would hide the peer.
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = conn.set_read_timeout(Some(timeout));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    });
    let mut greeting = String::new();
    if let Err(e) = reader.read_line(&mut greeting) {
        return format!(
            "{{\"ok\":false,\"connected\":true,\"error\":{},\"peer\":{},\"local\":{}}}",
            json_str(&e.to_string()),
            json_str(&peer),
            json_str(&local)
        );
    }
    let mut w = &conn;
    let _ = w.write_all(send.as_bytes());
    let _ = conn.shutdown(Shutdown::Write);
    let mut echo = String::new();
    let read = reader.read_to_string(&mut echo);
    let ok = read.is_ok() && !greeting.is_empty();
    let error = match (&read, greeting.is_empty()) {
        (Err(e), _) => e.to_string(),
        (Ok(_), true) => "connection closed before the greeting".into(),
        _ => String::new(),
    };
    format!(
        "{{\"ok\":{ok},\"connected\":true,\"error\":{},\"peer\":{},\"local\":{},\"greeting\":{},\"echo\":{}}}",
        json_str(&error),
        json_str(&peer),
        json_str(&local),
        json_str(greeting.trim_end()),
        json_str(&echo)
    )
}

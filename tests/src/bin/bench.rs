//! `ferry-bench`: the load generator and server of `cargo xtask bench`. Clients print their samples as
//! text (`key=value` header lines, then one sample in nanoseconds per line) for the bench to parse.
//!
//! - `serve --echo PORT --sink PORT --hold PORT [--verify]`: echo (request/response, churn), sink
//!   (bulk: counts bytes to EOF and answers a [`SinkReport`]; with `--verify` it also compares every
//!   byte with what `bulk --verify` senders send) and hold (idle connections: echoes one byte, then keeps
//!   the connection open until the peer closes). Prints `listening` once bound.
//! - `rr --to ADDR --size N --count K --warmup W`: one persistent connection, K timed round trips.
//! - `churn --to ADDR --size N --count K`: K sequential connect, request/response, close.
//! - `bulk --to ADDR --streams S --bytes B [--verify]`: S parallel streams into the sink, B bytes in
//!   all; with `--verify` every word carries its stream offset, for a sink that verifies.
//! - `hold --to ADDR --count N`: opens N connections (one byte round trip each), prints `open`, keeps
//!   them until stdin closes, then closes them and prints `closed`.
//! - `relay LISTEN=TO ...`: the bench's reference proxy, about the least a userspace hop can do:
//!   each connection accepted on a `LISTEN` address is copied both ways to its `TO` address by two
//!   blocking threads (no TLS, no framing, no policy; half-close carried). A pair of them, one per
//!   node, shows what any design with a proxy at both ends costs on this machine. Prints `listening`
//!   once every address is bound.
//!
//! Every measuring loop is a blocking socket with `TCP_NODELAY`, one thread per stream, and
//! `Instant` around each operation: the client must cost as little as possible, for direct TCP and
//! Ferry alike.
use std::{
    io::{BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Barrier, Mutex},
    time::{Duration, Instant},
};

type Res<T> = Result<T, String>;

/// What bulk streams send: 8-byte little-endian words, each the stream offset it is sent at (with
/// `--verify`; otherwise the first 256 KiB repeated, which costs the sender nothing per write). A byte
/// duplicated, lost or reordered in transit breaks the sequence where it happened, and the word found
/// there tells where in the stream the wrong bytes came from.
const PATTERN_LEN: usize = 256 * 1024;

fn pattern() -> Vec<u8> {
    let mut p = vec![0u8; PATTERN_LEN];
    fill(&mut p, 0);
    p
}

/// Writes the words of stream offsets `base..` (`base` a multiple of 8) into `buf`.
fn fill(buf: &mut [u8], base: u64) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let word = (base + 8 * i as u64).to_le_bytes();
        w.copy_from_slice(&word[..w.len()]);
    }
}

/// The sink's answer at the end of a stream: bytes counted, and the first stream offset whose byte
/// differs from the pattern (`u64::MAX`: none, or not verified) with the 16 bytes found from the
/// word boundary before it.
struct SinkReport {
    total: u64,
    bad_at: u64,
    found: [u8; 16],
}

impl SinkReport {
    const LEN: usize = 32;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.total.to_le_bytes());
        b[8..16].copy_from_slice(&self.bad_at.to_le_bytes());
        b[16..].copy_from_slice(&self.found);
        b
    }

    fn decode(b: &[u8; Self::LEN]) -> Self {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let mut found = [0u8; 16];
        found.copy_from_slice(&b[16..]);
        SinkReport {
            total: word(0),
            bad_at: word(8),
            found,
        }
    }
}

fn main() {
    raise_nofile();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("serve") => serve(&args),
        Some("rr") => rr(&args),
        Some("churn") => churn(&args),
        Some("bulk") => bulk(&args),
        Some("hold") => hold(&args),
        Some("relay") => relay(&args),
        _ => Err("usage: ferry-bench serve|rr|churn|bulk|hold|relay ...".into()),
    };
    if let Err(e) = r {
        eprintln!("ferry-bench: {e}");
        std::process::exit(1);
    }
}

/// Soft RLIMIT_NOFILE up to the hard limit: the hold test needs 10,000+ descriptors per process.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str) -> Res<u64> {
    let v = arg(args, name).ok_or_else(|| format!("missing {name}"))?;
    v.parse().map_err(|e| format!("{name} {v:?}: {e}"))
}

fn addr(args: &[String]) -> Res<SocketAddr> {
    let v = arg(args, "--to").ok_or("missing --to")?;
    v.parse().map_err(|e| format!("--to {v:?}: {e}"))
}

fn connect(to: SocketAddr) -> Res<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    // A stuck path fails the run instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

fn print_samples(header: &str, samples: &[u64]) {
    let mut out = String::with_capacity(samples.len() * 8 + header.len() + 1);
    out.push_str(header);
    out.push('\n');
    for s in samples {
        out.push_str(&s.to_string());
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

fn rr(args: &[String]) -> Res<()> {
    let to = addr(args)?;
    let size = num(args, "--size")? as usize;
    let count = num(args, "--count")? as usize;
    let warmup = num(args, "--warmup").unwrap_or(200) as usize;
    let mut s = connect(to)?;
    let req = vec![b'r'; size];
    let mut resp = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..warmup + count {
        let t = Instant::now();
        s.write_all(&req).map_err(|e| format!("write: {e}"))?;
        s.read_exact(&mut resp).map_err(|e| format!("read: {e}"))?;
        if i >= warmup {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    let elapsed = start.elapsed().as_nanos();
    print_samples(&format!("elapsed_ns={elapsed}"), &samples);
    Ok(())
}

fn churn(args: &[String]) -> Res<()> {
    let to = addr(args)?;
    let size = num(args, "--size")? as usize;
    let count = num(args, "--count")? as usize;
    let req = vec![b'c'; size];
    let mut resp = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        let mut s = connect(to)?;
        s.write_all(&req).map_err(|e| format!("write: {e}"))?;
        s.read_exact(&mut resp).map_err(|e| format!("read: {e}"))?;
        drop(s);
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = start.elapsed().as_nanos();
    print_samples(&format!("elapsed_ns={elapsed}"), &samples);
    Ok(())
}

fn bulk(args: &[String]) -> Res<()> {
    let to = addr(args)?;
    let streams = num(args, "--streams")?.max(1) as usize;
    let total = num(args, "--bytes")?;
    let per = total / streams as u64;
    let verify = args.iter().any(|a| a == "--verify");
    // Every stream connects first, so the clock measures transfer, not connection setup.
    let barrier = Arc::new(Barrier::new(streams + 1));
    let mut handles = Vec::new();
    for _ in 0..streams {
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || -> Res<u64> {
            let conn = connect(to);
            barrier.wait();
            let mut s = conn?;
            let mut buf = pattern();
            let mut left = per;
            while left > 0 {
                let n = (buf.len() as u64).min(left) as usize;
                if verify {
                    fill(&mut buf, per - left);
                }
                s.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let mut ack = [0u8; SinkReport::LEN];
            s.read_exact(&mut ack)
                .map_err(|e| format!("reading the sink's count: {e}"))?;
            let report = SinkReport::decode(&ack);
            if report.bad_at != u64::MAX {
                let aligned = report.bad_at / 8 * 8;
                let words: Vec<String> = report
                    .found
                    .chunks(8)
                    .map(|w| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(w);
                        format!("{:#x}", u64::from_le_bytes(b))
                    })
                    .collect();
                return Err(format!(
                    "the sink received other bytes than were sent from stream offset {} on (of {} counted): the words from offset {aligned} ({aligned:#x}) were {} (each word is the stream offset it was sent at{})",
                    report.bad_at,
                    report.total,
                    words.join(" "),
                    if verify { "" } else { ", modulo 256 KiB" },
                ));
            }
            Ok(report.total)
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut received = 0;
    for h in handles {
        received += h.join().map_err(|_| "stream thread panicked")??;
    }
    let elapsed = start.elapsed().as_nanos();
    if received != per * streams as u64 {
        return Err(format!(
            "the sink counted {received} bytes, {} sent",
            per * streams as u64
        ));
    }
    println!("elapsed_ns={elapsed}\nbytes={received}");
    Ok(())
}

fn hold(args: &[String]) -> Res<()> {
    let to = addr(args)?;
    let count = num(args, "--count")? as usize;
    let start = Instant::now();
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = connect(to)?;
        // A round trip proves the connection is carried end to end, not just accepted locally.
        let mut b = [b'h'];
        s.write_all(&b)
            .and_then(|_| s.read_exact(&mut b))
            .map_err(|e| format!("connection {i}: {e}"))?;
        conns.push(s);
    }
    println!("open={count} elapsed_ns={}", start.elapsed().as_nanos());
    let _ = std::io::stdout().flush();
    // Held until the bench closes our stdin.
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
        line.clear();
    }
    drop(conns);
    println!("closed");
    Ok(())
}

fn relay(args: &[String]) -> Res<()> {
    let mut listeners = Vec::new();
    for pair in &args[1..] {
        let (at, to) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?}: want LISTEN=TO"))?;
        let at: SocketAddr = at.parse().map_err(|e| format!("{at:?}: {e}"))?;
        let to: SocketAddr = to.parse().map_err(|e| format!("{to:?}: {e}"))?;
        let l = TcpListener::bind(at).map_err(|e| format!("listen on {at}: {e}"))?;
        listeners.push((l, to));
    }
    if listeners.is_empty() {
        return Err("relay: no LISTEN=TO pair".into());
    }
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(l, to)| std::thread::spawn(move || relay_from(&l, to)))
        .collect();
    println!("listening");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn relay_from(listener: &TcpListener, to: SocketAddr) {
    for c in listener.incoming() {
        let Ok(a) = c else { continue };
        let Ok(b) = TcpStream::connect(to) else {
            continue;
        };
        let _ = a.set_nodelay(true);
        let _ = b.set_nodelay(true);
        let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
            continue;
        };
        std::thread::spawn(move || pump(a, b));
        std::thread::spawn(move || pump(b2, a2));
    }
}

/// Copies `from` into `to` until EOF or an error, then passes the end on.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Read);
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn listen(port: u16) -> Res<TcpListener> {
    TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("listen on {port}: {e}"))
}

fn serve(args: &[String]) -> Res<()> {
    let echo = listen(num(args, "--echo")? as u16)?;
    let sink = listen(num(args, "--sink")? as u16)?;
    let hold = listen(num(args, "--hold")? as u16)?;
    let verify = args.iter().any(|a| a == "--verify");
    // Acceptor threads serve their connection inline: no thread creation per connection, so churn
    // measures the path, not the server.
    let mut threads = Vec::new();
    for _ in 0..8 {
        let l = echo.try_clone().map_err(|e| e.to_string())?;
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                serve_echo(c);
            }
        }));
    }
    for _ in 0..9 {
        let l = sink.try_clone().map_err(|e| e.to_string())?;
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                serve_sink(c, verify);
            }
        }));
    }
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let h = held.clone();
    threads.push(std::thread::spawn(move || {
        for mut c in hold.incoming().flatten() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8];
            if c.read_exact(&mut b).and_then(|_| c.write_all(&b)).is_ok()
                && let Ok(mut v) = h.lock()
            {
                v.push(c);
            }
        }
    }));
    threads.push(std::thread::spawn(move || reap(&held)));
    println!("listening");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Echoes what `c` sends until its end, then ends its own side.
fn serve_echo(c: TcpStream) {
    let _ = c.set_nodelay(true);
    if let Ok(w) = c.try_clone() {
        pump(c, w);
    }
}

fn serve_sink(mut c: TcpStream, verify: bool) {
    let mut want = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut report = SinkReport {
        total: 0,
        bad_at: u64::MAX,
        found: [0; 16],
    };
    loop {
        let n = match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return,
        };
        if verify {
            check(&mut want, report.total, &buf[..n], &mut report);
        }
        report.total += n as u64;
    }
    let _ = c.write_all(&report.encode());
}

/// Compares `got`, read at stream offset `at`, with what was sent there (`want` is scratch space);
/// records the first difference.
fn check(want: &mut Vec<u8>, at: u64, got: &[u8], report: &mut SinkReport) {
    if report.bad_at != u64::MAX {
        return;
    }
    let skew = (at % 8) as usize;
    want.resize(skew + got.len(), 0);
    fill(want, at - skew as u64);
    let want = &want[skew..];
    if got == want {
        return;
    }
    let bad = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    report.bad_at = at + bad as u64;
    // From the word boundary (in stream offsets) before the first difference.
    let start = bad.saturating_sub((report.bad_at % 8) as usize);
    let end = (start + 16).min(got.len());
    report.found[..end - start].copy_from_slice(&got[start..end]);
}

/// Closes held connections whose peer closed: a half-closed connection left open would keep the
/// agents' state alive and spoil the "after close" memory figure.
fn reap(held: &Mutex<Vec<TcpStream>>) {
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(mut v) = held.lock() else { return };
        if v.is_empty() {
            continue;
        }
        let mut fds: Vec<libc::pollfd> = v
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n <= 0 {
            continue;
        }
        let mut keep = Vec::with_capacity(v.len());
        for (mut s, p) in v.drain(..).zip(fds) {
            if p.revents == 0 {
                keep.push(s);
                continue;
            }
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Ok(0) | Err(_) => {}
                Ok(_) => keep.push(s),
            }
        }
        *v = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(stream: &[u8], reads: usize) -> SinkReport {
        let mut want = Vec::new();
        let mut report = SinkReport {
            total: 0,
            bad_at: u64::MAX,
            found: [0; 16],
        };
        for piece in stream.chunks(reads) {
            check(&mut want, report.total, piece, &mut report);
            report.total += piece.len() as u64;
        }
        report
    }

    #[test]
    fn the_sink_finds_a_duplicated_buffer_where_it_was_inserted() {
        let mut sent = vec![0u8; 3 * PATTERN_LEN];
        fill(&mut sent, 0);
        assert_eq!(verify(&sent, 65_483).bad_at, u64::MAX, "the pattern itself");
        // One 65,483-byte buffer delivered twice, 100,000 bytes into the stream.
        let mut dup = sent[..100_000].to_vec();
        dup.extend_from_slice(&sent[100_000 - 65_483..]);
        let r = verify(&dup, 65_483);
        assert_eq!(r.bad_at, 100_000);
        assert_eq!(r.found[..8], sent[34_517..34_525], "what came again");
        // A repeat as long as the first 256 KiB the sender repeats without --verify is found too.
        let mut lap = sent[..400_000].to_vec();
        lap.extend_from_slice(&sent[400_000 - PATTERN_LEN..]);
        let r = verify(&lap, 65_536);
        // The first byte that differs: the words' low bytes agree.
        assert_eq!(r.bad_at, 400_002);
        assert_eq!(
            r.found[..8],
            (400_000 - PATTERN_LEN as u64).to_le_bytes(),
            "the offset sent at"
        );
        let mut lost = sent.clone();
        lost.remove(300_000);
        assert_eq!(verify(&lost, 4096).bad_at, 300_000);
    }
}

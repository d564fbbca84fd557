//! `ferry-bench`: the load generator and server of `cargo xtask bench`. Clients print their samples as
//! text (`key=value` header lines, then one sample in nanoseconds per line) for the bench to parse.
//!
//! - `serve --echo PORT --sink PORT --hold PORT`: echo (request/response, churn), sink (bulk: counts
//!   bytes to EOF, answers the count as 8 bytes LE) and hold (idle connections: echoes one byte, then
//!   keeps the connection open until the peer closes). Prints `listening` once bound.
//! - `rr --to ADDR --size N --count K --warmup W`: one persistent connection, K timed round trips.
//! - `churn --to ADDR --size N --count K`: K sequential connect, request/response, close.
//! - `bulk --to ADDR --streams S --bytes B`: S parallel streams into the sink, B bytes in all.
//! - `hold --to ADDR --count N`: opens N connections (one byte round trip each), prints `open`, keeps
//!   them until stdin closes, then closes them and prints `closed`.
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

fn main() {
    raise_nofile();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("serve") => serve(&args),
        Some("rr") => rr(&args),
        Some("churn") => churn(&args),
        Some("bulk") => bulk(&args),
        Some("hold") => hold(&args),
        _ => Err("usage: ferry-bench serve|rr|churn|bulk|hold ...".into()),
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
    // Every stream connects first, so the clock measures transfer, not connection setup.
    let barrier = Arc::new(Barrier::new(streams + 1));
    let mut handles = Vec::new();
    for _ in 0..streams {
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || -> Res<u64> {
            let conn = connect(to);
            barrier.wait();
            let mut s = conn?;
            let buf = vec![b'b'; 256 * 1024];
            let mut left = per;
            while left > 0 {
                let n = (buf.len() as u64).min(left) as usize;
                s.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack)
                .map_err(|e| format!("reading the sink's count: {e}"))?;
            Ok(u64::from_le_bytes(ack))
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

fn listen(port: u16) -> Res<TcpListener> {
    TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("listen on {port}: {e}"))
}

fn serve(args: &[String]) -> Res<()> {
    let echo = listen(num(args, "--echo")? as u16)?;
    let sink = listen(num(args, "--sink")? as u16)?;
    let hold = listen(num(args, "--hold")? as u16)?;
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
                serve_sink(c);
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

fn serve_echo(mut c: TcpStream) {
    let _ = c.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn serve_sink(mut c: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = c.write_all(&total.to_le_bytes());
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

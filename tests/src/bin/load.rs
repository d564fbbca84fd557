//! `ferry-load`: steady load against a `ferry-testapp serve` echo server while agents are replaced.
//!
//! `ferry-load --to ADDR --long N --stop-file PATH [--max-seconds S] [--churn-ms MS]`
//!
//! - N long-lived transfers: each streams 1 KiB chunks of a known byte pattern and checks every echoed
//!   byte against it (and an FNV-1a checksum of all bytes sent against all bytes received) until the
//!   stop file appears, then half-closes and expects a clean EOF.
//! - One churn loop: a new connection every MS milliseconds (connect, greeting, 16-byte echo, close),
//!   each failure recorded with its time and error.
//!
//! Prints `started` once every long-lived transfer is connected, then one JSON line with the counts.
//! Bounded: everything stops after `--max-seconds` (default 60) even without the stop file.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const CHUNK: usize = 1024;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

struct Long {
    ok: bool,
    bytes: u64,
    error: String,
}

fn connect(to: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>), String> {
    let conn =
        TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let _ = conn.set_nodelay(true);
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut greeting = String::new();
    match reader.read_line(&mut greeting) {
        Ok(0) => return Err("closed before the greeting".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("greeting: {e}")),
    }
    Ok((conn, reader))
}

fn long(to: SocketAddr, started: &Barrier, stop: &AtomicBool) -> Long {
    let fail = |bytes, error: String| Long {
        ok: false,
        bytes,
        error,
    };
    let (mut conn, mut reader) = match connect(to) {
        Ok(c) => c,
        Err(e) => {
            started.wait();
            return fail(0, e);
        }
    };
    started.wait();
    let (mut offset, mut sent_hash, mut recv_hash) =
        (0u64, 0xcbf2_9ce4_8422_2325u64, 0xcbf2_9ce4_8422_2325u64);
    let mut out = [0u8; CHUNK];
    let mut back = [0u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        for (j, b) in out.iter_mut().enumerate() {
            *b = pattern(offset + j as u64);
        }
        if let Err(e) = conn.write_all(&out) {
            return fail(offset, format!("write at byte {offset}: {e}"));
        }
        fnv(&mut sent_hash, &out);
        if let Err(e) = reader.read_exact(&mut back) {
            return fail(offset, format!("read at byte {offset}: {e}"));
        }
        fnv(&mut recv_hash, &back);
        if let Some(j) = (0..CHUNK).find(|&j| back[j] != pattern(offset + j as u64)) {
            return fail(offset, format!("wrong byte at {}", offset + j as u64));
        }
        offset += CHUNK as u64;
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = conn.shutdown(Shutdown::Write) {
        return fail(offset, format!("half-close: {e}"));
    }
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(0) if sent_hash == recv_hash => Long {
            ok: true,
            bytes: offset,
            error: String::new(),
        },
        Ok(0) => fail(offset, "checksums differ".into()),
        Ok(n) => fail(offset, format!("{n} unexpected bytes before EOF")),
        Err(e) => fail(offset, format!("waiting for EOF: {e}")),
    }
}

fn churn_once(to: SocketAddr) -> Result<(), String> {
    let (mut conn, mut reader) = connect(to)?;
    let msg = b"0123456789abcdef";
    conn.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut back = [0u8; 16];
    reader
        .read_exact(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if &back != msg {
        return Err("wrong echo".into());
    }
    Ok(())
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(to) = arg(&args, "--to").and_then(|v| v.parse::<SocketAddr>().ok()) else {
        eprintln!(
            "usage: ferry-load --to ADDR --long N --stop-file PATH [--max-seconds S] [--churn-ms MS]"
        );
        std::process::exit(2);
    };
    let n: usize = arg(&args, "--long")
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let stop_file = PathBuf::from(arg(&args, "--stop-file").unwrap_or_default());
    let max = Duration::from_secs(
        arg(&args, "--max-seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let churn_every = Duration::from_millis(
        arg(&args, "--churn-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let begin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(n + 1));
    let longs: Vec<_> = (0..n)
        .map(|_| {
            let (stop, started) = (stop.clone(), started.clone());
            std::thread::spawn(move || long(to, &started, &stop))
        })
        .collect();
    started.wait();
    println!("started");
    let _ = std::io::stdout().flush();
    let (mut new_ok, mut new_failed, mut errors) = (0u64, 0u64, Vec::new());
    let stopped = |p: &Path| p.as_os_str().is_empty() || p.exists();
    while !stopped(&stop_file) && begin.elapsed() < max {
        match churn_once(to) {
            Ok(()) => new_ok += 1,
            Err(e) => {
                new_failed += 1;
                if errors.len() < 20 {
                    errors.push(format!("{} ms: {e}", begin.elapsed().as_millis()));
                }
            }
        }
        std::thread::sleep(churn_every);
    }
    stop.store(true, Ordering::Relaxed);
    let (mut long_ok, mut long_broken, mut long_bytes) = (0u64, 0u64, 0u64);
    for h in longs {
        let r = h.join().unwrap_or(Long {
            ok: false,
            bytes: 0,
            error: "panicked".into(),
        });
        long_bytes += r.bytes;
        if r.ok {
            long_ok += 1;
        } else {
            long_broken += 1;
            if errors.len() < 40 {
                errors.push(format!("long-lived: {}", r.error));
            }
        }
    }
    let errors: Vec<String> = errors.iter().map(|e| json_str(e)).collect();
    println!(
        "{{\"long_ok\":{long_ok},\"long_broken\":{long_broken},\"long_bytes\":{long_bytes},\"new_ok\":{new_ok},\"new_failed\":{new_failed},\"seconds\":{:.1},\"errors\":[{}]}}",
        begin.elapsed().as_secs_f64(),
        errors.join(",")
    );
}

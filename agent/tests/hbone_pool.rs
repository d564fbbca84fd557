//! The HBONE connection pool against a real server over loopback.
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use ferry::tunnel::{HboneClient, HboneStream, Pool, PoolConfig, PooledClient, TunnelError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn client_addr() -> SocketAddr {
    SocketAddr::from(([10, 9, 9, 9], 40000))
}

/// The pool's connect closure for `server`, counting the connections it opens.
fn dialer(
    server: SocketAddr,
    count: &Arc<AtomicUsize>,
) -> impl FnOnce() -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<HboneClient, TunnelError>> + Send>,
> + use<> {
    let count = count.clone();
    move || {
        Box::pin(async move {
            count.fetch_add(1, Ordering::SeqCst);
            let tcp = TcpStream::connect(server).await?;
            HboneClient::handshake_with(tcp, client_config()).await
        })
    }
}

async fn get(
    pool: &Pool<&'static str>,
    key: &'static str,
    generation: u64,
    server: SocketAddr,
    count: &Arc<AtomicUsize>,
) -> PooledClient {
    within(
        "pool get",
        pool.get_or_connect(key, generation, dialer(server, count)),
    )
    .await
    .expect("pool get_or_connect")
}

async fn echo_check(stream: &mut HboneStream, seed: u8) {
    let data = pattern(1000, seed);
    stream.write_all(&data).await.expect("write");
    let mut back = vec![0u8; data.len()];
    within("echo", stream.read_exact(&mut back))
        .await
        .expect("read");
    assert!(back == data, "echo differs");
}

#[tokio::test]
async fn streams_beyond_bound_open_another_connection() {
    let harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let pool = Pool::new(PoolConfig {
        max_streams_per_connection: 2,
        ..PoolConfig::default()
    });
    let count = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = get(&pool, "k", 1, harness.addr, &count).await;
        clients.push(c.client().clone());
        streams.push(c.connect(echo, client_addr()).await.expect("CONNECT"));
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert!(clients[0].same_connection(&clients[1]));
    assert!(!clients[0].same_connection(&clients[2]));
    let stats = pool.stats();
    assert_eq!((stats.connections, stats.streams), (2, 3), "{stats:?}");
    for (i, s) in streams.iter_mut().enumerate() {
        echo_check(s, i as u8).await;
    }
    // A finished stream frees its slot on the first connection: no third connection.
    streams.remove(0);
    let c = get(&pool, "k", 1, harness.addr, &count).await;
    assert!(c.same_connection(&clients[0]));
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn reserved_slot_counts_against_the_bound() {
    let harness = Harness::start().await;
    let pool = Pool::new(PoolConfig {
        max_streams_per_connection: 1,
        ..PoolConfig::default()
    });
    let count = Arc::new(AtomicUsize::new(0));
    let first = get(&pool, "k", 1, harness.addr, &count).await;
    // No stream opened yet, but the slot is taken.
    let second = get(&pool, "k", 1, harness.addr, &count).await;
    assert!(!first.same_connection(&second));
    drop(second);
    let third = get(&pool, "k", 1, harness.addr, &count).await;
    assert!(!third.same_connection(&first));
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn newer_generation_gets_a_new_connection_old_one_drains() {
    let harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let pool = Pool::new(PoolConfig::default());
    let count = Arc::new(AtomicUsize::new(0));
    let old = get(&pool, "k", 1, harness.addr, &count).await;
    let old_client = old.client().clone();
    let mut old_stream = old.connect(echo, client_addr()).await.expect("CONNECT");

    let new = get(&pool, "k", 2, harness.addr, &count).await;
    assert!(!new.same_connection(&old_client));
    assert_eq!(new.generation(), 2);
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // A request of the old generation does not bring the old connection back either.
    let again = get(&pool, "k", 1, harness.addr, &count).await;
    assert!(again.same_connection(&new));
    drop(again);

    // The old connection keeps serving its stream.
    echo_check(&mut old_stream, 5).await;
    let stats = pool.stats();
    assert_eq!((stats.connections, stats.draining), (2, 1), "{stats:?}");

    drop(old_stream);
    pool.reap();
    let stats = pool.stats();
    assert_eq!((stats.connections, stats.draining), (1, 0), "{stats:?}");
    drop(old_client);
}

#[tokio::test]
async fn different_keys_never_share() {
    let harness = Harness::start().await;
    let pool = Pool::new(PoolConfig::default());
    let count = Arc::new(AtomicUsize::new(0));
    let a = get(&pool, "a", 1, harness.addr, &count).await;
    let b = get(&pool, "b", 1, harness.addr, &count).await;
    assert!(!a.same_connection(&b));
    let a2 = get(&pool, "a", 1, harness.addr, &count).await;
    assert!(
        a2.same_connection(&a),
        "the same key must reuse its connection"
    );
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_eq!(pool.stats().keys, 2);
}

#[tokio::test]
async fn concurrent_callers_share_one_connect() {
    let harness = Harness::start().await;
    let pool = Pool::new(PoolConfig::default());
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let pool = pool.clone();
        let count = count.clone();
        let addr = harness.addr;
        tasks.push(tokio::spawn(async move {
            pool.get_or_connect("k", 1, || async move {
                count.fetch_add(1, Ordering::SeqCst);
                // A slow handshake: everyone else arrives while it is in flight.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let tcp = TcpStream::connect(addr).await?;
                HboneClient::handshake_with(tcp, client_config()).await
            })
            .await
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(within("get", t).await.expect("task").expect("client"));
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(held.iter().all(|c| c.same_connection(&held[0])));
    assert_eq!(pool.stats().streams, 50);
}

#[tokio::test]
async fn failed_connect_is_reported_and_retried() {
    let harness = Harness::start().await;
    let pool = Pool::new(PoolConfig::default());
    let dead = closed_port().await;
    let count = Arc::new(AtomicUsize::new(0));
    let e = pool
        .get_or_connect("k", 1, dialer(dead, &count))
        .await
        .expect_err("nothing listens");
    assert!(matches!(e, TunnelError::Io(_)), "{e:?}");
    let ok = get(&pool, "k", 1, harness.addr, &count).await;
    assert!(ok.is_ready());
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn dead_connection_is_replaced() {
    let harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let pool = Pool::new(PoolConfig::default());
    let count = Arc::new(AtomicUsize::new(0));
    let first = get(&pool, "k", 1, harness.addr, &count).await;
    let first_client = first.client().clone();
    // A stream round trip makes sure the server has taken the connection before it is cut.
    let mut s = first.connect(echo, client_addr()).await.expect("CONNECT");
    echo_check(&mut s, 0).await;
    harness.kill_connections();
    within("client sees the end", first_client.closed()).await;
    let second = get(&pool, "k", 1, harness.addr, &count).await;
    assert!(!second.same_connection(&first_client));
    let mut s2 = second.connect(echo, client_addr()).await.expect("CONNECT");
    echo_check(&mut s2, 1).await;
    drop(s);
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_connections_are_released() {
    let mut harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let pool = Pool::new(PoolConfig {
        idle_timeout: Duration::from_millis(100),
        ..PoolConfig::default()
    });
    let count = Arc::new(AtomicUsize::new(0));
    let c = get(&pool, "k", 1, harness.addr, &count).await;
    let mut s = c.connect(echo, client_addr()).await.expect("CONNECT");
    // Busy connections are kept, however long.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.stats().connections, 1);
    echo_check(&mut s, 2).await;
    drop(s);
    // The background reaper releases it; the server then sees the client close the connection.
    let (_, r) = within("server sees the close", harness.results.recv())
        .await
        .expect("result");
    assert!(r.is_ok(), "a released connection closes gracefully: {r:?}");
    assert_eq!(pool.stats(), ferry::tunnel::PoolStats::default());
}

/// After a burst that needed several connections of one key, one idle connection stays for the
/// key's next stream and the spare ones are released sooner.
#[tokio::test]
async fn spare_idle_connections_go_first_one_stays() {
    let harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let pool = Pool::new(PoolConfig {
        max_streams_per_connection: 1,
        idle_timeout: Duration::from_secs(60),
        spare_idle_timeout: Duration::from_millis(100),
    });
    let count = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for seed in 0..3 {
        let c = get(&pool, "k", 1, harness.addr, &count).await;
        let mut s = c.connect(echo, client_addr()).await.expect("CONNECT");
        echo_check(&mut s, seed).await;
        streams.push(s);
    }
    assert_eq!(pool.stats().connections, 3, "one connection per stream");
    drop(streams);
    within("spares released", async {
        while pool.stats().connections > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pool.stats().connections,
        1,
        "the first idle connection stays"
    );
    let c = get(&pool, "k", 1, harness.addr, &count).await;
    let mut s = c.connect(echo, client_addr()).await.expect("CONNECT");
    echo_check(&mut s, 9).await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        3,
        "the kept connection was reused"
    );
}

#[tokio::test]
async fn two_hundred_concurrent_streams_intact() {
    let harness = Harness::start().await;
    let (echo, _) = echo_upstream().await;
    let pool = Pool::new(PoolConfig::default());
    let count = Arc::new(AtomicUsize::new(0));
    // All streams stay open until every one has started, so 200 are truly concurrent.
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let pool = pool.clone();
        let count = count.clone();
        let barrier = barrier.clone();
        let addr = harness.addr;
        tasks.push(tokio::spawn(async move {
            let client = pool.get_or_connect("k", 1, dialer(addr, &count)).await?;
            let id = client.id();
            let stream = client.connect(echo, client_addr()).await?;
            barrier.wait().await;
            let data = pattern(64 * 1024, i as u8);
            let (mut r, mut w) = tokio::io::split(stream);
            let to_send = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&to_send).await?;
                w.shutdown().await
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await?;
            writer.await.map_err(std::io::Error::other)??;
            Ok::<_, TunnelError>((back == data, id))
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (intact, id) = within("stream", t).await.expect("task").expect("stream ok");
        assert!(intact, "a stream's echo differs");
        ids.insert(id);
    }
    assert_eq!(
        ids.len(),
        2,
        "200 streams at 100 per connection need 2 connections"
    );
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

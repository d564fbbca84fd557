use std::time::Duration;

/// HTTP/2 settings of HBONE connections. The defaults are what ztunnel uses (hbone.md); peers that
/// interoperate with ztunnel expect windows of this size for throughput.
#[derive(Debug, Clone)]
pub struct H2Settings {
    /// SETTINGS_INITIAL_WINDOW_SIZE: per-stream receive window.
    pub initial_stream_window: u32,
    /// Receive window of the whole connection; bounds the data buffered for all streams together.
    pub initial_connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE.
    pub max_frame_size: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list_size: u32,
    /// Bytes h2 may buffer per stream for sending before the writer waits.
    pub max_send_buffer_size: usize,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            initial_stream_window: 4 * 1024 * 1024,
            initial_connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            max_send_buffer_size: 256 * 1024,
        }
    }
}

/// PING keepalive: a peer that vanishes without closing TCP (node died, network cut) would otherwise
/// hold its streams open forever.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// Time between PINGs.
    pub interval: Duration,
    /// The connection is dropped when a PING gets no reply within this time.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Runs the keepalive until a PING goes unanswered; returns then. If the connection ends, the PING
/// fails and this never returns, leaving the report of the end to the connection future itself.
pub(crate) async fn keepalive(mut ping_pong: h2::PingPong, config: Keepalive) -> Duration {
    loop {
        tokio::time::sleep(config.interval).await;
        match tokio::time::timeout(config.timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => std::future::pending::<()>().await,
            Err(_elapsed) => return config.timeout,
        }
    }
}

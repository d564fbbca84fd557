//! The admin Unix socket (mode 0600) the `ferry` CLI talks to.
use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::api::{Request, Response};

/// Answers admin requests; implemented by the daemon.
pub trait AdminApi: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Result<serde_json::Value, String>;
}

const MAX_REQUEST: usize = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the socket, replacing a stale one left by a previous agent.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, api: Arc<dyn AdminApi>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let api = api.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, api)).await;
        });
    }
}

async fn answer(stream: UnixStream, api: Arc<dyn AdminApi>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST as u64));
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => match api.handle(req) {
            Ok(data) => Response {
                ok: true,
                error: None,
                data,
            },
            Err(e) => Response {
                ok: false,
                error: Some(e),
                data: serde_json::Value::Null,
            },
        },
        Err(e) => Response {
            ok: false,
            error: Some(format!("bad request: {e}")),
            data: serde_json::Value::Null,
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// The CLI side: one request, one response.
pub async fn request(path: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let unreachable = |e: io::Error| ClientError::Unreachable {
        path: path.to_owned(),
        source: e,
    };
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| unreachable(io::ErrorKind::TimedOut.into()))?
        .map_err(unreachable)?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(unreachable)?;
    let mut reply = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT * 2, BufReader::new(r).read_line(&mut reply))
        .await
        .map_err(|_| ClientError::Protocol("the agent did not answer in time".into()))?
        .map_err(unreachable)?;
    let response: Response =
        serde_json::from_str(reply.trim()).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if response.ok {
        Ok(response.data)
    } else {
        Err(ClientError::Agent(response.error.unwrap_or_default()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source} (is `ferry run` running on this node?)")]
    Unreachable { path: PathBuf, source: io::Error },
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
    #[error("{0}")]
    Agent(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl AdminApi for Echo {
        fn handle(&self, request: Request) -> Result<serde_json::Value, String> {
            match request {
                Request::Status => Ok(serde_json::json!({"node": "n1"})),
                other => Err(format!("not here: {other:?}")),
            }
        }
    }

    #[tokio::test]
    async fn round_trip_errors_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(serve(listener, Arc::new(Echo)));
        let v = request(&path, &Request::Status).await.unwrap();
        assert_eq!(v["node"], "n1");
        let err = request(&path, &Request::Certs)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not here"), "{err}");
        // Garbage gets an error answer, and the server keeps serving.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{nonsense\n").await.unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).await.unwrap();
        assert!(reply.contains("bad request"), "{reply}");
        assert!(request(&path, &Request::Status).await.is_ok());
    }

    #[tokio::test]
    async fn a_missing_agent_is_one_clear_line_naming_the_socket() {
        let err = request(Path::new("/nonexistent/ferry.sock"), &Request::Status)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/ferry.sock") && err.contains("ferry run"),
            "{err}"
        );
    }
}

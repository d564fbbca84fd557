//! Ending a live connection from outside its task (a policy reload that now denies it), without
//! holding a second descriptor per connection.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy::LocalStream;

#[derive(Default)]
pub struct KillSwitch {
    killed: AtomicBool,
    notify: tokio::sync::Notify,
    /// The task polling a [`Killable`] stream, to wake when the switch is thrown.
    waker: Mutex<Option<Waker>>,
}

impl KillSwitch {
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
        if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Resolves once the switch is thrown (for tasks that can `select!` on it).
    pub async fn killed(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_killed() {
                return;
            }
            notified.await;
        }
    }

    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        if self.is_killed() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed by a policy change",
            ));
        }
        if let Ok(mut w) = self.waker.lock() {
            match w.as_ref() {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        Ok(())
    }
}

/// A stream that fails with `ConnectionAborted` once its switch is thrown, for relays that run
/// inside code Ferry does not poll itself (the HBONE server's).
pub struct Killable<T> {
    inner: T,
    switch: Arc<KillSwitch>,
}

impl<T> Killable<T> {
    pub fn new(inner: T, switch: Arc<KillSwitch>) -> Self {
        Self { inner, switch }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Killable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: LocalStream> LocalStream for Killable<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.switch.check(cx)?;
        self.inner.poll_read_ready(cx)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Killable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_thrown_switch_ends_a_blocked_read_and_the_select() {
        let (a, mut b) = tokio::io::duplex(64);
        let switch = Arc::new(KillSwitch::default());
        let mut k = Killable::new(a, switch.clone());
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(k.read(&mut buf).await.unwrap(), 1);
        let reader = tokio::spawn(async move { k.read(&mut buf).await });
        let waiter = {
            let s = switch.clone();
            tokio::spawn(async move { s.killed().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        switch.kill();
        let r = tokio::time::timeout(std::time::Duration::from_secs(2), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        tokio::time::timeout(std::time::Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        drop(b);
    }
}

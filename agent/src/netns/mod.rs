//! Running socket syscalls inside another network namespace.
//!
//! A socket belongs to the netns it was created in, whatever thread later uses it. So the agent, one
//! process in the node's netns, switches the calling thread into a pod's netns only for the `socket()`
//! call and switches straight back: a few syscalls, no thread per pod.
pub mod route;

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::sched::{CloneFlags, setns};

const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

thread_local! {
    /// The calling thread's own netns, opened the first time it enters another one. A thread is
    /// only ever outside it inside [`Netns::run`], which always brings it back, so the handle stays
    /// right for the thread's life; keeping it saves an open and a close per delivery socket.
    static HOME: std::cell::OnceCell<File> = const { std::cell::OnceCell::new() };
}

/// An open handle on a network namespace.
#[derive(Clone, Debug)]
pub struct Netns {
    file: Arc<File>,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let ns = Self {
            file: Arc::new(file),
            path: path.to_owned(),
        };
        // Entering and leaving once proves it is a netns before anything depends on it.
        ns.run(|| Ok(())).map_err(|e| match e {
            RunError::Enter(NetnsError::Enter {
                source: nix::Error::EINVAL,
                ..
            }) => NetnsError::NotNetns {
                path: path.to_owned(),
            },
            RunError::Enter(e) => e,
            RunError::Inner(_) => unreachable!("closure returns Ok"),
        })?;
        Ok(ns)
    }

    /// The netns of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        let path = PathBuf::from("/proc/thread-self/ns/net");
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            file: Arc::new(file),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this netns, then returns the thread to its own netns.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> Result<T, RunError> {
        HOME.with(|cell| {
            let home = match cell.get() {
                Some(home) => home,
                None => {
                    let home = File::open(THREAD_NETNS).map_err(|source| {
                        RunError::Enter(NetnsError::Open {
                            path: THREAD_NETNS.into(),
                            source,
                        })
                    })?;
                    cell.get_or_init(|| home)
                }
            };
            self.run_from(home, f)
        })
    }

    fn run_from<T>(&self, home: &File, f: impl FnOnce() -> io::Result<T>) -> Result<T, RunError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
            RunError::Enter(NetnsError::Enter {
                path: self.path.clone(),
                source,
            })
        })?;
        let out = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread left in a pod's netns would open later sockets in the wrong place: there is no
            // safe way to continue.
            tracing::error!(error = %e, "cannot return to the agent's network namespace; aborting");
            std::process::abort();
        }
        out.map_err(RunError::Inner)
    }

    /// A TCP socket (not yet bound or connected) that lives in this netns.
    pub fn tcp_socket(&self, v6: bool) -> Result<socket2::Socket, RunError> {
        let domain = if v6 {
            socket2::Domain::IPV6
        } else {
            socket2::Domain::IPV4
        };
        self.run(|| {
            socket2::Socket::new(
                domain,
                socket2::Type::STREAM.nonblocking().cloexec(),
                Some(socket2::Protocol::TCP),
            )
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Enter(#[from] NetnsError),
    #[error(transparent)]
    Inner(io::Error),
}

impl From<RunError> for io::Error {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Inner(e) => e,
            RunError::Enter(e) => io::Error::other(e),
        }
    }
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The kernel's cookie of the netns a socket lives in: the same value eBPF's `bpf_get_netns_cookie`
/// returns for sockets of that netns.
pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    socket_option_u64(sock, SO_NETNS_COOKIE)
}

/// A `SOL_SOCKET` option whose value is a `u64` (the kernel's cookies).
pub fn socket_option_u64(sock: &impl AsRawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid u64.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Bytes a socket has received and not yet handed to a reader (`FIONREAD`).
pub fn unread_bytes(sock: &impl AsRawFd) -> io::Result<u64> {
    queue_ioctl(sock, libc::FIONREAD)
}

/// Bytes a TCP socket was given to send and its peer has not acknowledged yet (`TIOCOUTQ`).
pub fn unsent_bytes(sock: &impl AsRawFd) -> io::Result<u64> {
    queue_ioctl(sock, libc::TIOCOUTQ)
}

fn queue_ioctl(sock: &impl AsRawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_netns_is_named() {
        let err = Netns::open(Path::new("/proc/self/ns/uts"));
        match err {
            Err(NetnsError::NotNetns { path }) => assert_eq!(path, Path::new("/proc/self/ns/uts")),
            Err(NetnsError::Enter { .. }) => {} // not root: cannot tell, but it still failed cleanly
            other => panic!("expected an error, got {other:?}"),
        }
        let err = Netns::open(Path::new("/nonexistent/netns"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/netns"), "{err}");
    }
}

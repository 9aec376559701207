//! Where connections come from: AF_VSOCK in the guest, a Unix socket for tests on the host.
//! Both hand out the accepted connection as a `File`, so everything after accept is shared.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

/// Pending connections the kernel queues before accept.
const BACKLOG: i32 = 16;

pub enum Listener {
    Vsock { socket: OwnedFd, port: u32 },
    Unix { listener: UnixListener, path: PathBuf },
}

impl Listener {
    pub fn vsock(port: u32) -> io::Result<Self> {
        let socket = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        bind(socket.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&socket, Backlog::new(BACKLOG)?)?;
        Ok(Listener::Vsock { socket, port })
    }

    /// Refuses an existing path instead of deleting it: it may belong to someone else.
    pub fn unix(path: &Path) -> io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        Ok(Listener::Unix { listener, path: path.to_owned() })
    }

    pub fn accept(&self) -> io::Result<File> {
        match self {
            // CLOEXEC: children started by the agent must not inherit host connections.
            Listener::Vsock { socket, .. } => {
                Ok(File::from(accept4(socket, SockFlag::SOCK_CLOEXEC)?))
            }
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept()?;
                Ok(File::from(OwnedFd::from(stream)))
            }
        }
    }

    /// The Unix socket file to remove when the agent exits.
    pub fn socket_file(&self) -> Option<&Path> {
        match self {
            Listener::Vsock { .. } => None,
            Listener::Unix { path, .. } => Some(path),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Vsock { port, .. } => format!("vsock port {port}"),
            Listener::Unix { path, .. } => format!("unix socket {}", path.display()),
        }
    }
}

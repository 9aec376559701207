//! State shared by all connections, and the way out.

use std::path::PathBuf;
use std::time::Duration;

use crate::process::ProcessTable;

/// How long shutdown waits for killed children to be reaped.
const CHILD_KILL_GRACE: Duration = Duration::from_secs(1);

/// What `shutdown` (and SIGTERM/SIGINT) does after killing the children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownAction {
    /// Exit the agent only: the safe choice anywhere but in the guest.
    Exit,
    /// sync() and reboot(RB_AUTOBOOT): with `reboot=k` the guest's reset ends the VM.
    Reboot,
}

pub struct Agent {
    pub processes: ProcessTable,
    pub shutdown_action: ShutdownAction,
    /// The Unix socket file to remove on the way out.
    pub socket_file: Option<PathBuf>,
}

impl Agent {
    pub fn shut_down(&self) -> ! {
        log!("shutting down ({:?})", self.shutdown_action);
        self.processes.kill_all(CHILD_KILL_GRACE);
        if let Some(path) = &self.socket_file {
            if let Err(error) = std::fs::remove_file(path) {
                log!("cannot remove {}: {error}", path.display());
            }
        }
        if self.shutdown_action == ShutdownAction::Reboot {
            nix::unistd::sync();
            match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
                Ok(never) => match never {},
                Err(error) => log!("reboot failed: {error}; exiting instead"),
            }
        }
        std::process::exit(0)
    }
}

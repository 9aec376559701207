//! termlab's exit statuses, so that CI can tell a regression from a broken
//! machine: every error type the CLI can end with says which class it is in
//! ([`Classify`]), by its variant, never by its message.

use termlab_nested::NestedError;

use crate::engine::EngineError;
use crate::guest_image::GuestImageError;
use crate::results::ResultsError;
use crate::scenario::ScenarioError;

/// What a termlab command's exit status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// 0: every expectation of every scenario held.
    Pass,
    /// 1: a finding about the kernel under test: an expectation failed, or
    /// the guest panicked, hung, lost its agent or refused a step.
    Finding,
    /// 2: the command line or a scenario file is wrong (nothing was run).
    Usage,
    /// 3: the run could not be done: the VM or the nested L1 VM did not
    /// start, L1 hung, a tool, the kernel build or the agent is missing,
    /// results could not be written. Says nothing about the kernel.
    Infrastructure,
    /// 130: Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
    Interrupted,
}

/// The exit codes as `--help` states them.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0    every expectation of every scenario held
  1    a finding: an expectation failed, or the kernel under test panicked,
       hung, lost its agent or refused a step (the reason is printed)
  2    usage or scenario error: bad option, invalid scenario file (file:line:col),
       a path that does not exist, a --filter that matches nothing; nothing ran
  3    infrastructure: the VM or the nested L1 VM could not start, L1 hung,
       a tool, the kernel build or the guest agent is missing, results could
       not be written; says nothing about the kernel under test
  130  interrupted (Ctrl-C or SIGTERM)
With several scenarios the status is the most telling one: 130, then 1, then 3, then 0.";

impl ExitClass {
    pub fn code(self) -> u8 {
        match self {
            ExitClass::Pass => 0,
            ExitClass::Finding => 1,
            ExitClass::Usage => 2,
            ExitClass::Infrastructure => 3,
            ExitClass::Interrupted => 130,
        }
    }

    /// The class of a command's exit status, e.g. of the same command run
    /// inside the nested L1 VM; statuses termlab never gives on its own
    /// (a Rust panic's 101, a kill's 137, the L1 job's setup failure)
    /// are infrastructure.
    pub fn from_code(code: i32) -> ExitClass {
        match code {
            0 => ExitClass::Pass,
            1 => ExitClass::Finding,
            2 => ExitClass::Usage,
            3 => ExitClass::Infrastructure,
            130 => ExitClass::Interrupted,
            _ => ExitClass::Infrastructure,
        }
    }

    /// The class of a run of several scenarios: an interruption first, then
    /// a finding (a real result, not hidden by another scenario's broken
    /// machine), then infrastructure, then usage, then a pass.
    pub fn combine(self, other: ExitClass) -> ExitClass {
        fn rank(class: ExitClass) -> u8 {
            match class {
                ExitClass::Pass => 0,
                ExitClass::Usage => 1,
                ExitClass::Infrastructure => 2,
                ExitClass::Finding => 3,
                ExitClass::Interrupted => 4,
            }
        }
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }

    /// A short name, e.g. for a JUnit `<error type=...>`.
    pub fn name(self) -> &'static str {
        match self {
            ExitClass::Pass => "pass",
            ExitClass::Finding => "finding",
            ExitClass::Usage => "usage",
            ExitClass::Infrastructure => "infrastructure",
            ExitClass::Interrupted => "interrupted",
        }
    }
}

/// Which [`ExitClass`] an error ends a command with.
pub trait Classify {
    fn exit_class(&self) -> ExitClass;
}

impl Classify for ScenarioError {
    /// An unreadable or invalid scenario file is the user's to fix.
    fn exit_class(&self) -> ExitClass {
        ExitClass::Usage
    }
}

impl Classify for GuestImageError {
    fn exit_class(&self) -> ExitClass {
        match self {
            // Run from outside the checkout, or TERMLAB_ROOT names another directory.
            GuestImageError::NoRepository => ExitClass::Usage,
            // `--kernel` names no usable kernel, or one that lacks what the scenario needs
            // (System.map for verify_stack, the termination trace events): the caller's choice.
            GuestImageError::NoKernel { .. }
            | GuestImageError::NoImageInDir { .. }
            | GuestImageError::NotBzImage { .. }
            | GuestImageError::NoSystemMap { .. }
            | GuestImageError::MissingFeature { .. } => ExitClass::Usage,
            GuestImageError::NoBpftool { .. } | GuestImageError::NoSkeletonTools { .. } => {
                ExitClass::Infrastructure
            }
            GuestImageError::KernelNotBuilt { .. }
            | GuestImageError::KernelIncomplete { .. }
            | GuestImageError::NoAgent { .. }
            | GuestImageError::Command { .. }
            | GuestImageError::Io { .. }
            | GuestImageError::BuildLock(_)
            | GuestImageError::BuildInfo { .. } => ExitClass::Infrastructure,
        }
    }
}

impl Classify for ResultsError {
    /// Results that cannot be written or read back: the disk, not the kernel.
    fn exit_class(&self) -> ExitClass {
        ExitClass::Infrastructure
    }
}

impl Classify for NestedError {
    /// The nested launcher never judges the kernel: whatever stops it (no
    /// usable KVM, QEMU missing or failing, L1 hung or timed out) is the machine's.
    fn exit_class(&self) -> ExitClass {
        match self {
            NestedError::Interrupted(_) => ExitClass::Interrupted,
            _ => ExitClass::Infrastructure,
        }
    }
}

impl Classify for crate::user_programs::UserProgramError {
    fn exit_class(&self) -> ExitClass {
        use crate::user_programs::UserProgramError;
        match self {
            // The scenario's own source does not compile: the caller's input.
            UserProgramError::Compile { .. }
            | UserProgramError::Loader { .. }
            | UserProgramError::NoBtfHeader { .. } => ExitClass::Usage,
            UserProgramError::NoClang { .. }
            | UserProgramError::SkeletonTools { .. }
            | UserProgramError::Io { .. } => ExitClass::Infrastructure,
        }
    }
}

impl Classify for EngineError {
    fn exit_class(&self) -> ExitClass {
        use termlab_protocol::client::ClientError;
        use termlab_vmm::ExitReason;
        match self {
            EngineError::Image(error) => error.exit_class(),
            EngineError::Results(error) => error.exit_class(),
            EngineError::Report(_) => ExitClass::Infrastructure,
            EngineError::Programs(error) => error.exit_class(),
            // The VMM could not create or start the VM.
            EngineError::Vm(_) => ExitClass::Infrastructure,
            // The guest never became reachable: the VM did not start.
            EngineError::NoAgent { .. } => ExitClass::Infrastructure,
            // The guest's own doing (a panic, a reboot, a triple fault, a
            // halt) is a finding; KVM or the VMM failing, or the VM stopped
            // from the host, is not.
            EngineError::VmExited { exit, .. } => match exit {
                ExitReason::Panic { .. }
                | ExitReason::Reset
                | ExitReason::TripleFault
                | ExitReason::Halted => ExitClass::Finding,
                ExitReason::Stopped | ExitReason::VcpuError { .. } => ExitClass::Infrastructure,
            },
            EngineError::Agent { source, .. } => match source {
                // The guest refused a request (a sysctl it lacks, a failed
                // load): a finding about the guest.
                ClientError::Agent { .. } => ExitClass::Finding,
                // Transport failures during measurement become Hung or
                // AgentGone; left here they happened while connecting.
                ClientError::Send { .. }
                | ClientError::Receive { .. }
                | ClientError::Timeout { .. }
                | ClientError::Closed { .. } => ExitClass::Infrastructure,
                // A protocol mismatch: the agent build does not fit this termlab.
                ClientError::ResponseTooLong { .. }
                | ClientError::MalformedResponse(_)
                | ClientError::UnexpectedReply { .. }
                | ClientError::VersionMismatch { .. }
                | ClientError::Encode(_) => ExitClass::Infrastructure,
            },
            // The guest did not do what a step asked (a loader, trigger or
            // exec failed or ran too long, a tool printed nothing usable).
            EngineError::TimedOut { .. }
            | EngineError::ExecFailed { .. }
            | EngineError::CommandFailed { .. }
            | EngineError::UnexpectedOutput { .. }
            | EngineError::LoaderSilent { .. }
            | EngineError::TraceLinesMissing { .. }
            | EngineError::GuestFileTooLarge { .. }
            | EngineError::ProgInfoFailed { .. }
            | EngineError::NoTrigger { .. }
            | EngineError::NoSystemMap => ExitClass::Finding,
            EngineError::StackProbe { .. } => ExitClass::Infrastructure,
            EngineError::Hung { .. }
            | EngineError::AgentGone { .. }
            | EngineError::Unkillable { .. } => ExitClass::Finding,
            EngineError::Host { .. } | EngineError::HostTool { .. } | EngineError::Internal(_) => {
                ExitClass::Infrastructure
            }
            EngineError::Interrupted => ExitClass::Interrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_foreign_codes_are_infrastructure() {
        for class in [
            ExitClass::Pass,
            ExitClass::Finding,
            ExitClass::Usage,
            ExitClass::Infrastructure,
            ExitClass::Interrupted,
        ] {
            assert_eq!(ExitClass::from_code(class.code().into()), class);
        }
        // A Rust panic (101), a SIGKILL (137), the L1 job's `cd` failing (125).
        for code in [101, 137, 125, -1] {
            assert_eq!(ExitClass::from_code(code), ExitClass::Infrastructure, "{code}");
        }
    }

    #[test]
    fn a_finding_outranks_a_broken_machine_and_an_interruption_outranks_all() {
        use ExitClass::*;
        assert_eq!(Pass.combine(Infrastructure), Infrastructure);
        assert_eq!(Infrastructure.combine(Finding), Finding);
        assert_eq!(Finding.combine(Infrastructure), Finding);
        assert_eq!(Finding.combine(Interrupted), Interrupted);
        assert_eq!(Pass.combine(Pass), Pass);
    }

    #[test]
    fn guest_faults_are_findings_and_host_faults_infrastructure() {
        use std::path::PathBuf;
        use std::time::Duration;
        use termlab_vmm::ExitReason;
        let console = PathBuf::from("/x/console.log");
        let exited = |exit| EngineError::VmExited { exit, console: console.clone() };
        assert_eq!(
            exited(ExitReason::Panic { console_tail: String::new() }).exit_class(),
            ExitClass::Finding
        );
        assert_eq!(exited(ExitReason::TripleFault).exit_class(), ExitClass::Finding);
        assert_eq!(
            exited(ExitReason::VcpuError { vcpu: 0, message: "KVM_RUN".into() }).exit_class(),
            ExitClass::Infrastructure
        );
        let hung = EngineError::Hung {
            what: "exec".into(),
            waited: Duration::from_secs(1),
            vcpus: String::new(),
            console: console.clone(),
            tail: String::new(),
        };
        assert_eq!(hung.exit_class(), ExitClass::Finding);
        let no_agent = EngineError::NoAgent {
            waited: Duration::from_secs(180),
            detail: "refused".into(),
            console: console.clone(),
            vcpus: String::new(),
            tail: String::new(),
        };
        assert_eq!(no_agent.exit_class(), ExitClass::Infrastructure);
        let not_built = EngineError::Image(GuestImageError::KernelNotBuilt { variant: "default" });
        assert_eq!(not_built.exit_class(), ExitClass::Infrastructure);
        assert_eq!(EngineError::Interrupted.exit_class(), ExitClass::Interrupted);
        assert_eq!(
            NestedError::Timeout(Duration::from_secs(1800)).exit_class(),
            ExitClass::Infrastructure
        );
        assert_eq!(NestedError::Interrupted(2).exit_class(), ExitClass::Interrupted);
    }
}

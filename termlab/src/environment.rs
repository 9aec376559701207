//! Facts about the host a run executed on, for result.json.

use crate::results::HostInfo;

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// Hostname, kernel release, CPU model and count, memory. Unreadable
/// facts are recorded as "unknown", never guessed.
pub fn host_info() -> HostInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0);
    HostInfo {
        hostname: read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".to_owned()),
        kernel_release: read_trimmed("/proc/sys/kernel/osrelease")
            .unwrap_or_else(|| "unknown".to_owned()),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_mib: memory_kib / 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_info_reads_this_machine() {
        let host = host_info();
        // This test runs on Linux with /proc: every field is known.
        assert_ne!(host.hostname, "unknown");
        assert!(
            host.kernel_release.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{}",
            host.kernel_release
        );
        assert!(host.cpus >= 1);
        assert!(host.memory_mib >= 64, "{} MiB", host.memory_mib);
    }
}

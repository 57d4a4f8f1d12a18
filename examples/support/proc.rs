//! What the measurements read of their own process: a field of `/proc/self/status`.

/// Field `field` of `/proc/self/status` (`"VmRSS:"`, `"VmHWM:"`), in KiB; 0 where there is
/// no such file (not Linux) or field.
pub fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

//! Facts about the local host that both daemons use to find their own section of a shared config.

/// This machine's host name, as the kernel reports it.
pub fn hostname() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostname_is_not_empty() {
        assert!(!super::hostname().unwrap().is_empty());
    }
}

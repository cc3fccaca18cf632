//! Startup probe: can this kernel/process run the io_uring engine?
//!
//! Sets up a small ring and asks the kernel (`IORING_REGISTER_PROBE`) whether every opcode the
//! engine submits is supported. io_uring can be compiled out, disabled by sysctl
//! (`kernel.io_uring_disabled`), blocked by seccomp in containers, or too old for an opcode.

use std::io;

use io_uring::{IoUring, Probe, opcode};

/// Opcodes the io_uring engine submits, with names for the error message.
pub const REQUIRED_OPCODES: &[(u8, &str)] = &[
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
];

/// `Ok(())` when io_uring can be set up and supports every opcode in [`REQUIRED_OPCODES`].
pub fn probe_uring() -> io::Result<()> {
    // Syscall errors are returned as is so their errno (ENOSYS, EPERM, ...) survives.
    let ring = IoUring::new(4)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    missing_opcodes(|code| probe.is_supported(code))
}

/// Pure check over an opcode oracle: an `Unsupported` error naming every missing opcode.
pub fn missing_opcodes(supported: impl Fn(u8) -> bool) -> io::Result<()> {
    let missing: Vec<&str> = REQUIRED_OPCODES
        .iter()
        .filter(|(code, _)| !supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring lacks opcodes: {}", missing.join(", ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_supported_passes() {
        assert!(missing_opcodes(|_| true).is_ok());
    }

    #[test]
    fn missing_opcode_is_named() {
        let err = missing_opcodes(|c| c != opcode::Fallocate::CODE).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("FALLOCATE"), "{err}");
        assert!(!err.to_string().contains("READ"), "{err}");
    }

    #[test]
    fn this_machine_has_io_uring() {
        // Informational: the machine facts say io_uring works here; print rather than fail
        // so the suite stays meaningful on hosts where it is disabled.
        match probe_uring() {
            Ok(()) => {}
            Err(e) => eprintln!("io_uring unavailable on this host: {e}"),
        }
    }
}

//! File ownership on a host whose filed cannot set it (not root, no `CAP_CHOWN`). Such a host
//! cannot give a received file the sender's owner: the file keeps this process's user and group.
//! If it recorded that, its state would differ from the one its peers agreed on, and the
//! difference would look like a local change — a false conflict when the peer changes the file
//! next, or the owner sent back and forth between hosts for ever. So on such a host the owner on
//! disk carries no information: it records and sends the owner the file has for the group (the
//! one agreed with its peers, or the one on disk for a file new here), and an owner change made
//! on disk there is not a change. Mode, mtime and content are compared as everywhere.

use std::sync::OnceLock;

use crate::entry::FileState;

/// `CAP_CHOWN`: the capability to change any file's owner and group.
const CAP_CHOWN: u32 = 0;

/// Whether the effective capabilities in `/proc/self/status` text include `CAP_CHOWN`; `None`
/// when the text has no readable `CapEff` line.
pub fn cap_chown_in_status(status: &str) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_CHOWN) != 0)
}

/// Whether a process with effective user `euid` and the given `CAP_CHOWN` answer can set any
/// owner (root without capabilities cannot: a root in a user namespace or a bounded service).
pub fn can_set_owner_with(euid: u32, cap_chown: Option<bool>) -> bool {
    cap_chown.unwrap_or(euid == 0)
}

/// Whether this process can give files any owner (checked once).
pub fn can_set_owner() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        can_set_owner_with(euid, cap_chown_in_status(&status))
    })
}

/// The state to record for what is on disk (`seen`), given the state the group has for the path
/// (`known`: recorded, or the version just received). A host that can set owners records the
/// disk as it is. One that cannot keeps the known owner: the disk's owner is this process's (a
/// received file) or one it could not have set otherwise, and is not a change.
pub fn keep_owner(seen: &mut FileState, known: Option<&FileState>, can_set_owner: bool) {
    if can_set_owner {
        return;
    }
    if let Some(k) = known.filter(|k| k.exists()) {
        seen.uid = k.uid;
        seen.gid = k.gid;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Kind, NO_HASH};

    fn st(uid: u32, gid: u32) -> FileState {
        FileState {
            kind: Kind::File,
            size: 3,
            mtime_ns: 10,
            mode: 0o644,
            uid,
            gid,
            target: None,
            hash: NO_HASH,
        }
    }

    #[test]
    fn reads_cap_chown_from_proc_status() {
        let root = "Name:\tfiled\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        assert_eq!(cap_chown_in_status(root), Some(true));
        let user = "Name:\tfiled\nCapEff:\t0000000000000000\n";
        assert_eq!(cap_chown_in_status(user), Some(false));
        let only_chown = "CapEff:\t0000000000000001\n";
        assert_eq!(cap_chown_in_status(only_chown), Some(true));
        let no_chown = "CapEff:\t00000000000000fe\n";
        assert_eq!(cap_chown_in_status(no_chown), Some(false));
        assert_eq!(cap_chown_in_status("Name:\tx\n"), None);
        assert_eq!(cap_chown_in_status("CapEff:\tzz\n"), None);
    }

    #[test]
    fn who_can_set_owners() {
        assert!(can_set_owner_with(0, Some(true)));
        assert!(
            !can_set_owner_with(0, Some(false)),
            "root without CAP_CHOWN"
        );
        assert!(
            can_set_owner_with(1000, Some(true)),
            "a user with CAP_CHOWN"
        );
        assert!(!can_set_owner_with(1000, Some(false)));
        assert!(can_set_owner_with(0, None));
        assert!(!can_set_owner_with(1000, None));
    }

    #[test]
    fn a_host_that_can_set_owners_records_the_disk() {
        let mut s = st(1000, 1000);
        keep_owner(&mut s, Some(&st(0, 0)), true);
        assert_eq!(s, st(1000, 1000));
    }

    #[test]
    fn a_host_that_cannot_keeps_the_known_owner() {
        // received as root:root, on disk as the filed user
        let mut s = st(1000, 1000);
        keep_owner(&mut s, Some(&st(0, 0)), false);
        assert_eq!(s, st(0, 0));
        // everything else stays what is on disk
        let mut s = FileState {
            mode: 0o600,
            mtime_ns: 20,
            ..st(1000, 1000)
        };
        keep_owner(&mut s, Some(&st(0, 33)), false);
        assert_eq!(
            s,
            FileState {
                mode: 0o600,
                mtime_ns: 20,
                ..st(0, 33)
            }
        );
        // new here, or recreated after a deletion: the disk's owner
        let mut s = st(1000, 1000);
        keep_owner(&mut s, None, false);
        assert_eq!(s, st(1000, 1000));
        keep_owner(&mut s, Some(&FileState::deleted(5)), false);
        assert_eq!(s, st(1000, 1000));
    }
}

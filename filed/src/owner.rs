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

/// Whether an id map of `/proc/self/uid_map` or `gid_map` maps every id (the initial user
/// namespace: `0 0 4294967295`). In another user namespace root has `CAP_CHOWN` but can only give
/// the ids mapped there: a peer's owner generally is not, so such a host cannot set owners either.
/// An empty or unreadable map counts as mapping everything (no user namespaces).
pub fn maps_all_ids(map: &str) -> bool {
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| !f.is_empty())
        .collect();
    lines.is_empty() || lines.iter().any(|f| f[..] == ["0", "0", "4294967295"])
}

/// Whether this process can give files any owner (checked once).
pub fn can_set_owner() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        can_set_owner_with(euid, cap_chown_in_status(&read("/proc/self/status")))
            && maps_all_ids(&read("/proc/self/uid_map"))
            && maps_all_ids(&read("/proc/self/gid_map"))
    })
}

/// The state to record for what is on disk (`seen`), given what the group has for the path:
/// `agreed`, the state last agreed with a peer (or the version just received), and `recorded`,
/// the state recorded here. A host that can set owners records the disk as it is. One that
/// cannot keeps the group's owner: the disk's owner is this process's (a received file) or one it
/// could not have set otherwise, and is not a change. The agreed owner comes first: records made
/// before this rule existed hold this process's own user, which would go on looking like a change
/// on the peers (a false conflict at every edit) if they were kept.
pub fn keep_owner(
    seen: &mut FileState,
    agreed: Option<&FileState>,
    recorded: Option<&FileState>,
    can_set_owner: bool,
) {
    if can_set_owner {
        return;
    }
    if let Some(k) = agreed
        .filter(|k| k.exists())
        .or(recorded.filter(|k| k.exists()))
    {
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
    fn only_the_initial_user_namespace_maps_every_id() {
        assert!(maps_all_ids("         0          0 4294967295\n"));
        assert!(maps_all_ids(""), "no user namespaces");
        // a container: root is host uid 100000, 65536 ids mapped
        assert!(!maps_all_ids("         0     100000      65536\n"));
        // a rootless setup: own uid plus a subordinate range
        assert!(!maps_all_ids("0 1000 1\n1 100000 65536\n"));
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
        keep_owner(&mut s, Some(&st(0, 0)), Some(&st(0, 0)), true);
        assert_eq!(s, st(1000, 1000));
    }

    #[test]
    fn a_host_that_cannot_keeps_the_known_owner() {
        // received as root:root, on disk as the filed user
        let mut s = st(1000, 1000);
        keep_owner(&mut s, None, Some(&st(0, 0)), false);
        assert_eq!(s, st(0, 0));
        // everything else stays what is on disk
        let mut s = FileState {
            mode: 0o600,
            mtime_ns: 20,
            ..st(1000, 1000)
        };
        keep_owner(&mut s, None, Some(&st(0, 33)), false);
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
        keep_owner(&mut s, None, None, false);
        assert_eq!(s, st(1000, 1000));
        let gone = FileState::deleted(5);
        keep_owner(&mut s, Some(&gone), Some(&gone), false);
        assert_eq!(s, st(1000, 1000));
    }

    #[test]
    fn the_agreed_owner_wins_over_the_recorded_one() {
        // recorded before the rule: the filed user; agreed with the peer: root:www
        let mut s = st(1000, 1000);
        keep_owner(&mut s, Some(&st(0, 33)), Some(&st(1000, 1000)), false);
        assert_eq!(s, st(0, 33));
        // nothing agreed (never synced): the recorded owner
        let mut s = st(1000, 1000);
        keep_owner(&mut s, None, Some(&st(7, 8)), false);
        assert_eq!(s, st(7, 8));
        // agreed as deleted, recreated here and recorded since: the recorded owner
        let mut s = st(1000, 1000);
        keep_owner(&mut s, Some(&FileState::deleted(5)), Some(&st(7, 8)), false);
        assert_eq!(s, st(7, 8));
    }
}

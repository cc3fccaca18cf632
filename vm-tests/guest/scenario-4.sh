# vm-tests/guest/scenario-4.sh: resync under a mounted filesystem. Tree A is written while both
# nodes are connected; the host disconnects the secondary ("secondary-disconnected"); tree B is
# written; the guest unmounts and disconnects; the host reconnects the secondary, waits for the
# resync, promotes it and sends "promoted PORT"; the guest mounts the promoted node's export and
# both trees must match their checksums.
. /vmtest/guest/lib.sh
vt_nbd_connect "$NBD_DEV" "$VMT_PORT"
vt_run 300 "mkfs.ext4 $NBD_DEV" mkfs.ext4 -q -F "$NBD_DEV"
vt_run 60 "mount $NBD_DEV $MNT" mount -t ext4 "$NBD_DEV" "$MNT"
vt_make_tree "$MNT/a" /run/manifest-a
vt_run 300 "sync" sync
vt_event tree-a-written
vt_wait_host secondary-disconnected 300 >/dev/null || vt_fail "no 'secondary-disconnected' from the host within 300 s"
vt_make_tree "$MNT/b" /run/manifest-b
vt_run 300 "sync" sync
vt_run 120 "umount $MNT" umount "$MNT"
vt_nbd_disconnect "$NBD_DEV"
vt_event unmounted
port=$(vt_wait_host promoted 600) || vt_fail "no 'promoted PORT' from the host within 600 s"
vt_nbd_connect /dev/nbd1 "$port"
vt_fsck /dev/nbd1
vt_run 60 "mount /dev/nbd1 $MNT" mount -t ext4 /dev/nbd1 "$MNT"
vt_verify_tree "$MNT/a" /run/manifest-a
vt_verify_tree "$MNT/b" /run/manifest-b
vt_run 120 "umount $MNT" umount "$MNT"
vt_nbd_disconnect /dev/nbd1
vt_pass "resync: trees written before and during the secondary's disconnection match on the promoted secondary"

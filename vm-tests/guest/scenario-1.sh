# vm-tests/guest/scenario-1.sh: ext4 on the kernel NBD client, plain TCP. Connect, mkfs.ext4,
# mount, write a tree with known checksums, sync, unmount, then reconnect, e2fsck -fn clean,
# remount and verify every checksum.
. /vmtest/guest/lib.sh
vt_mount_cycle
vt_pass "ext4 on $NBD_DEV over nbd://$VMT_HOST:$VMT_PORT/$VMT_EXPORT: mkfs, write $(wc -l </run/manifest) files, e2fsck -fn clean, checksums verified after reconnect"

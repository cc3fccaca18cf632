//! A real ext4 filesystem on a blockd export without the kernel nbd module: nbdfuse exposes the export as a
//! file, losetup turns it into a block device, then mkfs.ext4, mount, write a tree, umount, `e2fsck -fn`,
//! remount and compare. Needs root. Everything is torn down in Drop, also when the test fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::fs_stack::FsStack;
use integration_tests::{
    Blockd, BlockdOptions, TestRng, file_checksum, require_tool, run_ok, run_timeout, wait_for,
};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// Writes a tree of files with pseudo-random contents and sizes; returns relative path -> checksum.
fn write_tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut rng = TestRng::new(77);
    let mut sums = BTreeMap::new();
    let sizes = [
        0u64,
        1,
        511,
        4096,
        4097,
        65_537,
        1 << 20,
        3 * MIB + 123,
        24 * MIB,
    ];
    for d in 0..6 {
        let dir = root.join(format!("dir{d}")).join(format!("sub{}", d % 3));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..8 {
            let size = if d == 0 && f == 0 {
                24 * MIB
            } else {
                sizes[rng.below(sizes.len() as u64 - 1) as usize]
            };
            let mut data = vec![0u8; size as usize];
            rng.fill(&mut data);
            let path = dir.join(format!("file{f}.bin"));
            std::fs::write(&path, &data).unwrap();
            sums.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                file_checksum(&path),
            );
        }
    }
    std::fs::write(root.join("README"), b"written through blockd\n").unwrap();
    sums.insert(PathBuf::from("README"), file_checksum(&root.join("README")));
    sums
}

fn read_tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut sums = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new("lost+found") {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                sums.insert(rel, file_checksum(&path));
            }
        }
    }
    sums
}

/// `e2fsck -fn` (force, read-only) must report a clean filesystem.
fn fsck_clean(e2fsck: &Path, target: &Path, what: &str) {
    let fsck = run_timeout(Command::new(e2fsck).args(["-f", "-n"]).arg(target), T);
    assert!(
        fsck.status.success(),
        "e2fsck -fn on {what} found problems ({}):\n{}\n{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

#[test]
fn ext4_on_nbdfuse_loop_device_survives_umount_fsck_and_remount() {
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs");
    let e2fsck = require_tool("e2fsck", "e2fsprogs");
    let server = Blockd::start_with(BlockdOptions {
        size: Some(256 * MIB),
        ..Default::default()
    });
    let work = server.dir().to_path_buf();
    let mnt = work.join("mnt");
    let mut stack = FsStack::new(&server.uri(), &work);
    wait_for(
        Duration::from_secs(10),
        || std::fs::metadata(stack.fuse_dir.join("nbd")).is_ok(),
        "nbdfuse file",
    );
    assert_eq!(
        std::fs::metadata(stack.fuse_dir.join("nbd")).unwrap().len(),
        256 * MIB
    );
    let dev = stack.attach_loop();

    run_ok(
        Command::new(&mkfs)
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&dev),
        T,
    );
    stack.mount(&mnt);
    let written = write_tree(&mnt);
    run_ok(&mut Command::new("sync"), T);
    stack.umount();
    // Detach the loop device so nothing is served from its page cache: the filesystem must now be complete in
    // blockd's backing file itself.
    stack.detach_loop();
    fsck_clean(&e2fsck, &server.backing, "the backing file after umount");
    // Read the largest file straight out of the backing file with debugfs.
    let big = PathBuf::from("dir0/sub0/file0.bin");
    let dumped = work.join("dumped.bin");
    run_ok(
        Command::new(require_tool("debugfs", "e2fsprogs"))
            .arg("-R")
            .arg(format!("dump /{} {}", big.display(), dumped.display()))
            .arg(&server.backing),
        T,
    );
    assert_eq!(std::fs::metadata(&dumped).unwrap().len(), 24 * MIB);
    assert_eq!(
        file_checksum(&dumped),
        written[&big],
        "{} differs in the backing file",
        big.display()
    );

    // Attach again (a fresh NBD path through nbdfuse), check and compare.
    let dev = stack.attach_loop();
    fsck_clean(&e2fsck, Path::new(&dev), "the loop device after re-attach");
    stack.mount(&mnt);
    let read = read_tree(&mnt);
    assert_eq!(read.len(), written.len());
    assert!(read == written, "file contents differ after remount");
    // Delete half the files; fstrim sends the freed blocks through loop and nbdfuse to blockd as TRIM.
    for (i, rel) in written.keys().enumerate() {
        if i % 2 == 0 {
            std::fs::remove_file(mnt.join(rel)).unwrap();
        }
    }
    run_ok(
        Command::new(require_tool("fstrim", "util-linux")).arg(&mnt),
        T,
    );
    stack.umount();
    stack.detach_loop();
    fsck_clean(&e2fsck, &server.backing, "the backing file after fstrim");
    drop(stack);
    server.stop();
}

//! A real filesystem on an NBD export without the kernel nbd module: nbdfuse exposes the export
//! as a file, losetup turns it into a block device, then mount — undone in reverse order on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{require_tool, run_ok, run_timeout};

const T: Duration = Duration::from_secs(120);

/// nbdfuse + loop device + mount point, undone in reverse order on drop.
pub struct FsStack {
    nbdfuse: Option<Child>,
    /// Holds the `nbd` file nbdfuse exposes.
    pub fuse_dir: PathBuf,
    loopdev: Option<String>,
    mounted: Option<PathBuf>,
}

impl FsStack {
    pub fn new(uri: &str, work: &Path) -> FsStack {
        let nbdfuse = require_tool("nbdfuse", "libnbd-bin");
        require_tool("fusermount3", "fuse3");
        let fuse_dir = work.join("fuse");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        let pidfile = work.join("nbdfuse.pid");
        let child = Command::new(nbdfuse)
            .arg("-P")
            .arg(&pidfile)
            .arg(fuse_dir.join("nbd"))
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let mut stack = FsStack {
            nbdfuse: Some(child),
            fuse_dir,
            loopdev: None,
            mounted: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            if let Some(status) = stack.nbdfuse.as_mut().unwrap().try_wait().unwrap() {
                panic!("nbdfuse exited early: {status}");
            }
            assert!(Instant::now() < deadline, "nbdfuse did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        stack
    }

    pub fn attach_loop(&mut self) -> String {
        let out = run_ok(
            Command::new(require_tool("losetup", "mount"))
                .args(["-f", "--show"])
                .arg(self.fuse_dir.join("nbd")),
            T,
        );
        let dev = out.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {out:?}");
        self.loopdev = Some(dev.clone());
        dev
    }

    pub fn detach_loop(&mut self) {
        if let Some(dev) = self.loopdev.take() {
            run_ok(
                Command::new(require_tool("losetup", "mount"))
                    .arg("-d")
                    .arg(&dev),
                T,
            );
        }
    }

    pub fn mount(&mut self, mnt: &Path) {
        std::fs::create_dir_all(mnt).unwrap();
        let dev = self.loopdev.clone().expect("loop device");
        run_ok(
            Command::new(require_tool("mount", "mount"))
                .arg(&dev)
                .arg(mnt),
            T,
        );
        self.mounted = Some(mnt.to_path_buf());
    }

    pub fn umount(&mut self) {
        if let Some(mnt) = self.mounted.take() {
            run_ok(Command::new(require_tool("umount", "mount")).arg(&mnt), T);
        }
    }
}

impl Drop for FsStack {
    fn drop(&mut self) {
        if let Some(mnt) = self.mounted.take() {
            let out = run_timeout(Command::new("umount").arg(&mnt), T);
            if !out.status.success() {
                let _ = run_timeout(Command::new("umount").arg("-l").arg(&mnt), T);
            }
        }
        if let Some(dev) = self.loopdev.take() {
            let out = run_timeout(Command::new("losetup").arg("-d").arg(&dev), T);
            if !out.status.success() {
                eprintln!("losetup -d {dev}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let out = run_timeout(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir), T);
        if !out.status.success() {
            eprintln!("fusermount3 -u: {}", String::from_utf8_lossy(&out.stderr));
            let _ = run_timeout(
                Command::new("fusermount3").arg("-uz").arg(&self.fuse_dir),
                T,
            );
        }
        if let Some(mut child) = self.nbdfuse.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() && !std::thread::panicking() {
                            panic!("nbdfuse exited with {status}");
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

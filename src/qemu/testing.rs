//! What the tests of `qemu` share: QEMU processes that die with the test
//! (killed and reaped on drop, also when it fails), a paused VM's command
//! line, and the test images.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed and reaped when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Proc {
    /// Starts `cmd` with no terminal I/O.
    pub(crate) fn spawn(cmd: &mut Command) -> Proc {
        let program = cmd.get_program().to_string_lossy().to_string();
        Proc(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {program} (make test installs it): {e}")),
        )
    }

    /// Waits until the process listens on Unix socket `path` (the file
    /// exists a moment before QEMU listens on it; a loaded host widens
    /// that moment).
    pub(crate) fn wait_for(&mut self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(path).is_err() {
            assert!(
                self.0.try_wait().unwrap().is_none(),
                "the process exited before listening on {}",
                path.display()
            );
            assert!(
                Instant::now() < deadline,
                "nothing listens on {} after 60 s",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A paused VM (`-S`, no firmware run yet) with QMP on `qmp` and one
/// virtio disk `vd0` on drive `drive0` over the raw image `img`.
pub(crate) fn paused_vm(img: &Path, qmp: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-S", "-nodefaults", "-display", "none", "-m", "64"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=drive0",
            img.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=drive0,id=vd0"]);
    c
}

/// Boots the image `name` (writes go to a throwaway overlay) with the
/// guest agent's port on `qga`, an `org.recoverfs.stay` port (the debian
/// image stays up), and QMP on `qmp` if given.
pub(crate) fn vm_with_agent(name: &str, qga: &Path, qmp: Option<&Path>) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-nographic", "-m", "512", "-no-reboot"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            image(name).display()
        ))
        .arg("-chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qga0",
            qga.display()
        ))
        .args(["-chardev", "null,id=stay", "-device", "virtio-serial"])
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .args([
            "-device",
            "virtserialport,chardev=stay,name=org.recoverfs.stay",
        ]);
    if let Some(q) = qmp {
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", q.display()));
    }
    c
}

/// Writes `pattern` over `off..off + len` of drive `drive0` through the
/// guest device's block backend (HMP `qemu-io`), as a guest write would.
pub(crate) fn hmp_write(q: &mut crate::qemu::qmp::Qmp, pattern: u8, off: usize, len: usize) {
    let out = q
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({"command-line":
                format!("qemu-io drive0 \"write -P {pattern:#x} {off} {len}\"")})),
        )
        .unwrap();
    // qemu-io's own report goes to QEMU's stdout; errors come back here.
    assert_eq!(out.as_str(), Some(""), "qemu-io: {out}");
}

/// A test VM image (`vm-images/build.sh NAME`, built on first use).
pub(crate) fn image(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join("vm-images/build.sh"))
        .arg(name)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim(),
    )
}

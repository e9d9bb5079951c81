//! Against a real QEMU (`qemu-system-x86_64 -S`, TCG, no guest needed): a
//! drive on a raw image, QMP on a Unix socket. Every QEMU started here is
//! killed when its guard drops, also when a test fails.

use super::*;
use crate::error::ErrorKind;
use crate::qemu::testing::{image, paused_vm, Proc};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

struct Vm {
    proc: Proc,
    qmp: PathBuf,
    _dir: tempfile::TempDir,
}

/// A paused VM (`-S`) with one virtio disk `vd0` on drive `drive0`.
fn vm() -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut proc = Proc::spawn(&mut paused_vm(&img, &qmp));
    proc.wait_for(&qmp);
    Vm {
        proc,
        qmp,
        _dir: dir,
    }
}

#[test]
fn connects_negotiates_and_reports_qemus_version_and_run_state() {
    let v = vm();
    let mut q = Qmp::connect(&v.qmp).unwrap();
    assert!(q.version().0 >= 7, "{:?}", q.version());
    let s = q.status().unwrap();
    assert_eq!((s.running, s.status.as_str()), (false, "prelaunch"));
    q.cont().unwrap();
    assert!(q.status().unwrap().running);
    q.stop().unwrap();
    assert_eq!(q.status().unwrap().status, "paused");
    // STOP came as an event, kept for the caller rather than mistaken for
    // a reply.
    let events: Vec<String> = q
        .take_events()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert!(events.contains(&"RESUME".to_string()), "{events:?}");
    assert!(events.contains(&"STOP".to_string()), "{events:?}");
}

#[test]
fn block_devices_name_the_drive_and_stats_count_what_a_booting_guest_writes() {
    // The tiny guest writes its boot counter and powers off; -no-shutdown
    // keeps QEMU (and its counters) for us, snapshot=on keeps the image.
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut proc = Proc::spawn(
        Command::new("qemu-system-x86_64")
            .args(["-S", "-nographic", "-no-shutdown", "-m", "256"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,id=drive0,snapshot=on",
                image("tiny").display()
            )),
    );
    proc.wait_for(&qmp);
    let v = Vm {
        proc,
        qmp,
        _dir: dir,
    };
    let mut q = Qmp::connect(&v.qmp).unwrap();
    let devs = q.block_devices().unwrap();
    assert_eq!(devs.len(), 1, "{devs:?}");
    assert_eq!(devs[0].device, "drive0");
    assert!(!devs[0].node_name.is_empty(), "{devs:?}");
    assert!(devs[0].qdev.contains("virtio"), "{devs:?}");
    assert_eq!(q.written_bytes().unwrap(), 0);
    q.cont().unwrap();
    q.wait_event("SHUTDOWN", Duration::from_secs(240)).unwrap();
    let stats = q.block_stats().unwrap();
    assert!(
        stats[0].wr_bytes >= 512 && stats[0].wr_operations >= 1,
        "{stats:?}"
    );
    assert!(stats[0].rd_bytes > stats[0].wr_bytes, "{stats:?}");
    // A stopped guest writes nothing: the rate over a window is zero.
    assert_eq!(q.write_rate(Duration::from_millis(100)).unwrap(), 0.0);
}

#[test]
fn an_error_reply_names_the_command_and_the_connection_stays_usable() {
    let v = vm();
    let mut q = Qmp::connect(&v.qmp).unwrap();
    let e = q.execute("no-such-command", None).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("QEMU refused no-such-command: CommandNotFound"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1);
    let e = q
        .execute(
            "block-dirty-bitmap-add",
            Some(json!({"node": "nope", "name": "b"})),
        )
        .unwrap_err();
    assert!(e.to_string().contains("GenericError"), "{e}");
    assert_eq!(q.status().unwrap().status, "prelaunch");
}

#[test]
fn a_missing_socket_a_non_qmp_peer_and_a_silent_one_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let e = Qmp::connect(&missing).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("none.sock"), "{e}");

    // A peer that speaks something else.
    let garbage = dir.path().join("garbage.sock");
    let l = std::os::unix::net::UnixListener::bind(&garbage).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"220 smtp.example ESMTP\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let e = Qmp::connect_with(&garbage, Duration::from_secs(5))
        .err()
        .unwrap();
    assert!(e.to_string().contains("not JSON"), "{e}");
    assert_eq!(e.to_string().lines().count(), 1);
    t.join().unwrap();

    // A peer that never speaks: the deadline ends the wait.
    let silent = dir.path().join("silent.sock");
    let l = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let t = std::thread::spawn(move || {
        let (_s, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let t0 = Instant::now();
    let e = Qmp::connect_with(&silent, Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        e.to_string()
            .contains("silent.sock answered no QMP greeting within 0.3 s"),
        "{e}"
    );
    t.join().unwrap();
}

/// A socket that accepts and never speaks (a chardev that is not a
/// monitor): [`GREETING_TIMEOUT`], not a command's 30 s, ends the wait,
/// in one line that says what to check.
#[test]
fn a_socket_that_never_greets_fails_after_the_greeting_timeout_not_30_s() {
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("serial.sock");
    let l = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let t = std::thread::spawn(move || {
        let (_s, _) = l.accept().unwrap();
        std::thread::sleep(GREETING_TIMEOUT + Duration::from_secs(3));
    });
    let t0 = Instant::now();
    let e = Qmp::connect(&silent).err().unwrap();
    let took = t0.elapsed();
    assert!(
        took >= GREETING_TIMEOUT && took < GREETING_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{} answered no QMP greeting within 5 s: is it the VM's QMP monitor socket (QEMU \
             greets at once), with no other client (libvirt, another recoverfs job) connected \
             to it?",
            silent.display()
        )
    );
    t.join().unwrap();
}

/// QEMU serves one client per monitor: a second one is accepted by the
/// kernel and left unanswered, which the greeting timeout ends too.
#[test]
fn a_monitor_that_already_has_a_client_fails_a_second_one_in_seconds() {
    let v = vm();
    let mut first = Qmp::connect(&v.qmp).unwrap();
    let t0 = Instant::now();
    let e = Qmp::connect(&v.qmp).err().unwrap();
    assert!(t0.elapsed() < GREETING_TIMEOUT + Duration::from_secs(2));
    assert!(e.to_string().contains("no other client"), "{e}");
    assert_eq!(first.status().unwrap().status, "prelaunch");
}

#[test]
fn a_vm_that_exits_mid_call_is_an_error_not_a_hang() {
    let mut v = vm();
    let mut q = Qmp::connect(&v.qmp).unwrap();
    let _ = v.proc.0.kill();
    let _ = v.proc.0.wait();
    let e = q.status().unwrap_err();
    assert!(
        e.to_string().contains("closed QMP socket") || e.to_string().contains("send query-status"),
        "{e}"
    );
}

#[test]
fn guest_disks_leave_out_drives_without_a_device_naming_each() {
    let dir = tempfile::tempdir().unwrap();
    let (img, x) = (dir.path().join("disk.raw"), dir.path().join("x.raw"));
    for f in [&img, &x] {
        std::fs::write(f, vec![0u8; 1 << 20]).unwrap();
    }
    let qmp = dir.path().join("qmp.sock");
    let mut cmd = paused_vm(&img, &qmp);
    cmd.arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=nodev", x.display()));
    let mut proc = Proc::spawn(&mut cmd);
    proc.wait_for(&qmp);
    let mut q = Qmp::connect(&qmp).unwrap();
    let (disks, skipped) = q.guest_disks().unwrap();
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert_eq!(disks[0].device, "drive0");
    assert_eq!(q.block_devices().unwrap(), disks);
    assert_eq!(
        skipped,
        [format!(
            "drive nodev ({}) has no guest device: not backed up",
            x.display()
        )]
    );
    drop(proc);
}

#[test]
fn guest_disks_leave_out_removable_media_naming_each() {
    let dir = tempfile::tempdir().unwrap();
    let (img, iso, fd) = (
        dir.path().join("disk.raw"),
        dir.path().join("cd.iso"),
        dir.path().join("fd.img"),
    );
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&iso, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&fd, vec![0u8; 1_474_560]).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut cmd = paused_vm(&img, &qmp);
    cmd.arg("-drive")
        .arg(format!(
            "if=ide,media=cdrom,index=2,format=raw,file={}",
            iso.display()
        ))
        // No disc: not a medium, not named.
        .args(["-drive", "if=ide,media=cdrom,index=3"])
        .arg("-drive")
        .arg(format!(
            "if=floppy,index=0,format=raw,file={}",
            fd.display()
        ))
        // A disc in a USB CD-ROM drive (a scsi-cd on the USB device's bus).
        .args(["-device", "qemu-xhci", "-drive"])
        .arg(format!(
            "if=none,id=usbcd,media=cdrom,format=raw,file={}",
            iso.display()
        ))
        .args(["-device", "usb-storage,drive=usbcd"]);
    let mut proc = Proc::spawn(&mut cmd);
    proc.wait_for(&qmp);
    let mut q = Qmp::connect(&qmp).unwrap();
    let (disks, skipped) = q.guest_disks().unwrap();
    // A writable floppy may hold the guest's writes: backed up.
    let names: Vec<&str> = disks.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(names, ["drive0", "floppy0"], "{disks:?}");
    // The guest devices' types: the buses a backup records.
    assert_eq!(disks[0].device_type, "virtio-blk-device");
    assert_eq!(disks[0].bus(), Some("virtio"));
    assert_eq!(disks[1].device_type, "floppy");
    assert_eq!(disks[1].bus(), None);
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    for (s, (drive, kind, file)) in skipped
        .iter()
        .zip([("ide1-cd0", "ide-cd", &iso), ("usbcd", "scsi-cd", &iso)])
    {
        assert!(
            s.starts_with(&format!("drive {drive} ({kind} /machine/"))
                && s.ends_with(&format!(
                    "holds a removable medium ({}): not backed up",
                    file.display()
                )),
            "{skipped:?}"
        );
    }
    drop(proc);
}

#[test]
fn machine_size_is_qemus_memory_and_vcpu_count() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut cmd = paused_vm(&img, &qmp);
    // The last -m counts (paused_vm gives one).
    cmd.args(["-m", "1024", "-smp", "2"]);
    let mut proc = Proc::spawn(&mut cmd);
    proc.wait_for(&qmp);
    let mut q = Qmp::connect(&qmp).unwrap();
    let m = q.machine_size().unwrap();
    assert_eq!((m.memory_mib, m.vcpus), (1024, 2));
    drop(proc);
}

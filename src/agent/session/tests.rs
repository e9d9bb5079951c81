//! What the host does once the agent in the guest has ended.

use super::*;
use std::io::Write;

/// The agent's stream in the socket (it has ended; its end of the socket
/// stays open, as QEMU's end of the port does), and a body that reads it
/// 64 KiB every 300 ms (a host behind a slow store): how much it read
/// before its stream ended, with `follow`.
fn slow_body_after_the_agent_ended(follow: bool) -> (usize, Duration) {
    let (mut agent, host) = UnixStream::pair().unwrap();
    let stream = vec![7u8; 1 << 20];
    let writer = std::thread::spawn(move || {
        // Fails once the host closed the stream.
        let _ = agent.write_all(&stream);
        agent
    });
    let done = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let deadline = Deadline::start(Duration::from_secs(60), Duration::from_secs(600));
    let t0 = Instant::now();
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            settle(
                &host,
                &done,
                follow,
                deadline,
                &stop,
                Duration::from_secs(1),
            )
        });
        let mut got = 0;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match (&host).read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        done.store(true, Ordering::SeqCst);
        got
    });
    drop(writer.join().unwrap());
    (got, t0.elapsed())
}

#[test]
fn a_backup_host_behind_the_stream_still_reads_all_the_agent_sent_after_it_ended() {
    let (got, took) = slow_body_after_the_agent_ended(true);
    assert_eq!(got, 1 << 20, "the stream was cut after {took:?}");
    // Then nothing more came: closed a grace later, not at the deadline.
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn without_following_the_stream_is_closed_a_grace_after_the_agent_ended() {
    // A restore's body writes to the agent, which reads no more: closed
    // a grace after, whatever waits to be read (what the socket holds
    // then is still read, the rest never comes).
    let (got, took) = slow_body_after_the_agent_ended(false);
    assert!(got < 1 << 20, "{got} bytes read in {took:?}");
}

#[test]
fn a_body_waiting_for_a_stream_that_brings_nothing_more_is_stopped_a_grace_later() {
    let (agent, host) = UnixStream::pair().unwrap();
    let done = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let deadline = Deadline::start(Duration::from_secs(60), Duration::from_secs(600));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| settle(&host, &done, true, deadline, &stop, Duration::from_secs(1)));
        let r = (&host).read(&mut [0u8; 16]);
        done.store(true, Ordering::SeqCst);
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    });
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(agent);
}

/// The agent killed in the guest: QEMU closes its end with the host's
/// keep-alives unread, and Linux fails the host's read with ECONNRESET.
/// That is the stream's end (the end-frame check then says truncated),
/// not an I/O error that hides what happened (the e2e test of a killed
/// agent failed with "Connection reset by peer" now and then).
#[test]
fn a_stream_whose_peer_closed_with_keep_alives_unread_ends_as_eof_not_an_error() {
    let (host, qemu) = UnixStream::pair().unwrap();
    (&host).write_all(b"K").unwrap();
    drop(qemu);
    let mut raw = [0u8; 8];
    let e = (&host).read(&mut raw).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset,
        "the kernel's answer"
    );
    let (host, qemu) = UnixStream::pair().unwrap();
    (&host).write_all(b"K").unwrap();
    drop(qemu);
    let d = Deadline::start(Duration::from_secs(5), Duration::from_secs(5));
    assert_eq!(d.reader(&host).read(&mut raw).unwrap(), 0);
}

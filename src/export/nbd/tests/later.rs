//! Reads the disk answers later (`Disk::read_later`): no blocking thread
//! waits for them, and their replies are the same as the blocking path's.

use super::*;

#[test]
fn reads_within_a_block_that_wait_are_answered_later_and_never_call_read_at() {
    let p = Probe::new(SIZE);
    let image = random(SIZE as usize, 21);
    p.inner.write_at(0, &image).unwrap();
    p.later.store(true, Ordering::SeqCst);
    *p.read_delay.lock().unwrap() = Duration::from_millis(200);
    let h = serve_one(p.clone());
    for structured in [true, false] {
        let mut c = if structured {
            h.open(EXPORT)
        } else {
            let mut c = h.client();
            c.go(EXPORT).unwrap();
            c
        };
        // 48 reads in flight, each within one block; more than tokio's
        // worker threads, all answered after one delay.
        let t = Instant::now();
        let mut asked: HashMap<u64, u64> = (0..48u64)
            .map(|i| (c.send(CMD_READ, 0, i * BS + 1000, 4096, &[]), i * BS + 1000))
            .collect();
        for _ in 0..48 {
            let (cookie, r) = c.recv();
            assert_eq!(r.error, 0);
            let off = asked.remove(&cookie).expect("one reply per request") as usize;
            assert!(r.data == image[off..off + 4096], "read at {off} differs");
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    assert_eq!(
        p.read_ats.load(Ordering::SeqCst),
        0,
        "a read took the blocking path"
    );
    // A read across two blocks takes the blocking path.
    let mut c = h.open(EXPORT);
    let r = c.read(BS - 10, 20);
    assert!(r == image[(BS - 10) as usize..(BS + 10) as usize]);
    assert_eq!(p.read_ats.load(Ordering::SeqCst), 1);
}

#[test]
fn a_read_answered_later_with_an_error_is_an_error_reply() {
    let p = Probe::new(SIZE);
    p.inner.write_at(0, &[7; 8192]).unwrap();
    p.later.store(true, Ordering::SeqCst);
    let h = serve_one(p.clone());
    let mut c = h.open(EXPORT);
    *p.fail.lock().unwrap() = Some(Error::corrupt("chunk damaged"));
    let cookie = c.send(CMD_READ, 0, 0, 4096, &[]);
    let (got, r) = c.recv();
    assert_eq!(got, cookie);
    assert_ne!(r.error, 0, "a failed read was answered with data");
    *p.fail.lock().unwrap() = None;
    assert_eq!(c.read(0, 4096), vec![7; 4096]);
}

#[test]
fn a_read_the_disk_would_answer_later_still_has_its_flags_checked() {
    let p = Probe::new(SIZE);
    p.later.store(true, Ordering::SeqCst);
    let h = serve_one(p.clone());
    let mut simple = h.client();
    simple.go(EXPORT).unwrap();
    let mut structured = h.open(EXPORT);
    let before = p.calls();
    // DF without structured replies, and NO_HOLE on a read: both invalid.
    assert_eq!(
        simple.call(CMD_READ, CMD_FLAG_DF, 0, 4096, &[]).error,
        NBD_EINVAL
    );
    assert_eq!(
        structured
            .call(CMD_READ, CMD_FLAG_NO_HOLE, 0, 4096, &[])
            .error,
        NBD_EINVAL
    );
    assert_eq!(p.calls(), before, "a refused read reached the disk");
    assert_eq!(structured.read(0, 4096), vec![0; 4096]);
}

use super::*;

fn entry(path: &str, size: u64) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1,
        mtime_nsec: 0,
        size,
        target: None,
        chunks: vec![],
        inode: None,
    }
}

/// A stream: hello, a log line, two files (one over a data frame), end.
fn sample() -> (Vec<u8>, Vec<u8>) {
    let big: Vec<u8> = (0..MAX_DATA + 1000).map(|i| (i % 251) as u8).collect();
    let mut w = FrameWriter::new(vec![]);
    w.hello(&Hello {
        version: "1".into(),
        binary: "0.1.0".into(),
        features: agent_features(),
    })
    .unwrap();
    w.log("hook app pre: quiesced").unwrap();
    w.header(&entry("/a", 3)).unwrap();
    w.data(b"abc").unwrap();
    w.header(&entry("/big", big.len() as u64)).unwrap();
    w.data(&big).unwrap();
    w.end().unwrap();
    (w.get_mut().clone(), big)
}

fn read_all(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut r = FrameReader::new(bytes, "the test stream");
    let mut files = vec![];
    loop {
        match r.next_frame()? {
            Frame::Header(e) => {
                let mut v = vec![];
                r.content(e.size)
                    .read_to_end(&mut v)
                    .map_err(|e| Error::io("content", e))?;
                files.push((e.path, v));
            }
            Frame::End(_) => return Ok(files),
            _ => {}
        }
    }
}

#[test]
fn a_stream_round_trips_and_every_truncation_is_an_error() {
    let (bytes, big) = sample();
    let files = read_all(&bytes).unwrap();
    assert_eq!(
        files,
        vec![("/a".into(), b"abc".to_vec()), ("/big".into(), big)]
    );
    // Cut anywhere (every point in the metadata, a stride through the
    // data): never a complete stream.
    let cuts: Vec<usize> = (0..200).chain((200..bytes.len()).step_by(997)).collect();
    for cut in cuts {
        let e = read_all(&bytes[..cut]).unwrap_err();
        assert!(
            e.to_string().contains("truncated") || e.to_string().contains("ended before"),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn a_changed_or_dropped_frame_fails_the_end_check() {
    let (bytes, _) = sample();
    // Flip a byte inside the big file's data.
    let mut flipped = bytes.clone();
    let at = bytes.len() - 2000;
    flipped[at] ^= 1;
    let e = read_all(&flipped).unwrap_err();
    assert!(e.to_string().contains("frames were lost"), "{e}");
    // Drop the log frame entirely (a lost frame, lengths intact).
    let mut r = FrameReader::new(&bytes[..], "s");
    r.next_frame().unwrap();
    let hello_len = bytes.len() - r.get_mut().len();
    let log_len =
        5 + u32::from_le_bytes(bytes[hello_len + 1..hello_len + 5].try_into().unwrap()) as usize;
    let mut dropped = bytes[..hello_len].to_vec();
    dropped.extend_from_slice(&bytes[hello_len + log_len..]);
    let e = read_all(&dropped).unwrap_err();
    assert!(e.to_string().contains("frames were lost"), "{e}");
}

#[test]
fn oversized_frames_and_content_overruns_are_refused_before_allocation() {
    let mut huge = vec![b'D'];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = FrameReader::new(&huge[..], "s").next_frame().unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    let mut w = FrameWriter::new(vec![]);
    w.header(&entry("/a", 2)).unwrap();
    w.data(b"abc").unwrap();
    let bytes = w.get_mut().clone();
    let mut r = FrameReader::new(&bytes[..], "s");
    r.next_frame().unwrap();
    let mut v = vec![];
    let e = r.content(2).read_to_end(&mut v).unwrap_err();
    assert!(e.to_string().contains("expected 2 more bytes"), "{e}");
    let e = FrameReader::new(&b"Q\0\0\0\0"[..], "s")
        .next_frame()
        .unwrap_err();
    assert!(e.to_string().contains("unknown frame type"), "{e}");
}

#[test]
fn keepalive_frames_are_passed_over_even_inside_a_file_and_carry_nothing() {
    let mut w = FrameWriter::new(vec![]);
    w.keepalive().unwrap();
    w.header(&entry("/a", 6)).unwrap();
    w.data(b"abc").unwrap();
    w.keepalive().unwrap();
    w.data(b"def").unwrap();
    w.keepalive().unwrap();
    w.end().unwrap();
    let got = read_all(w.get_mut()).unwrap();
    assert_eq!(got, vec![("/a".to_string(), b"abcdef".to_vec())]);
    let e = FrameReader::new(&b"K\x01\0\0\0x"[..], "s")
        .next_frame()
        .unwrap_err();
    assert!(e.to_string().contains("at most 0"), "{e}");
}

#[test]
fn a_hello_from_an_agent_built_before_the_port_wait_is_read_and_warned_about() {
    // What agents before the port wait sent: no `features`.
    let old: Hello = serde_json::from_str(r#"{"version":"3","binary":"0.1.0"}"#).unwrap();
    let w = old.warning().expect("an old agent is warned about");
    assert!(w.contains("agent build") && w.contains("quiesced"), "{w}");
    assert_eq!(w.lines().count(), 1, "{w}");
    let new = Hello {
        version: "4".into(),
        binary: "0.1.0".into(),
        features: agent_features(),
    };
    assert_eq!(new.warning(), None);
    // The guest agent's own hello carries the feature.
    let back: Hello = serde_json::from_slice(&serde_json::to_vec(&new).unwrap()).unwrap();
    assert_eq!(back.warning(), None);
    // A guest's hello cannot split a line the host prints.
    let odd = Hello {
        version: "3\nrecoverfs: done".into(),
        binary: "0.1\r".into(),
        features: vec![],
    };
    assert_eq!(odd.warning().unwrap().lines().count(), 1);
    assert_eq!(odd.describe().lines().count(), 1, "{}", odd.describe());
}

#[test]
fn log_frames_among_a_files_data_reach_the_log_only_where_asked_for() {
    let mut w = FrameWriter::new(vec![]);
    w.header(&entry("/a", 6)).unwrap();
    w.data(b"abc").unwrap();
    w.log("WARNING: /a shrank").unwrap();
    w.keepalive().unwrap();
    w.data(&[0; 3]).unwrap();
    w.end().unwrap();
    let bytes = w.get_mut().clone();
    let mut r = FrameReader::new(&bytes[..], "s");
    r.next_frame().unwrap();
    let lines = std::sync::Mutex::new(vec![]);
    let say = |l: &str| lines.lock().unwrap().push(l.to_string());
    let mut v = vec![];
    r.content_logging(6, &say).read_to_end(&mut v).unwrap();
    assert_eq!(v, b"abc\0\0\0");
    assert_eq!(lines.into_inner().unwrap(), ["WARNING: /a shrank"]);
    assert!(matches!(r.next_frame().unwrap(), Frame::End(_)));
    // Without a log to go to (the guest's side of a restore), still refused.
    let mut r = FrameReader::new(&bytes[..], "s");
    r.next_frame().unwrap();
    let e = r.content(6).read_to_end(&mut vec![]).unwrap_err();
    assert!(e.to_string().contains("got a log line"), "{e}");
}

#[test]
fn hole_frames_read_as_zeros_within_the_size_and_are_bounded() {
    let mut w = FrameWriter::new(vec![]);
    w.header(&entry("/s", 10)).unwrap();
    w.data(b"ab").unwrap();
    w.hole(5).unwrap();
    w.hole(0).unwrap();
    w.zeros(2, true).unwrap();
    w.data(b"c").unwrap();
    w.header(&entry("/t", 3)).unwrap();
    w.zeros(3, false).unwrap();
    w.end().unwrap();
    let bytes = w.get_mut().clone();
    // Two hole frames of 13 bytes, not 7 zeros; `zeros` without holes is data.
    assert_eq!(bytes.iter().filter(|&&b| b == b'Z').count(), 2);
    assert_eq!(
        read_all(&bytes).unwrap(),
        vec![
            ("/s".into(), b"ab\0\0\0\0\0\0\0c".to_vec()),
            ("/t".into(), vec![0; 3])
        ]
    );
    // A hole past the file's size is refused, as data past it is.
    let mut w = FrameWriter::new(vec![]);
    w.header(&entry("/a", 4)).unwrap();
    w.data(b"a").unwrap();
    w.hole(4).unwrap();
    w.end().unwrap();
    let e = read_all(w.get_mut()).unwrap_err();
    assert!(e.to_string().contains("a hole of 4 bytes"), "{e}");
    // A hole frame is exactly a u64.
    let e = FrameReader::new(&b"Z\x07\0\0\0\0\0\0\0\0\0\0"[..], "s")
        .next_frame()
        .unwrap_err();
    assert!(e.to_string().contains("not 8"), "{e}");
    let e = FrameReader::new(&b"Z\x09\0\0\0"[..], "s")
        .next_frame()
        .unwrap_err();
    assert!(e.to_string().contains("at most 8"), "{e}");
}

//! fixs3c: objects whose transfer takes longer than one attempt's timeout
//! (a large VM's manifest over a slow link), on a real store (Garage)
//! behind `scripts/latency-proxy.py --rate`.

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::garage::{Garage, BUCKET};
use recoverfs::repo::backend::Backend;
use recoverfs::repo::s3::S3Backend;

/// The proxy capping both directions at `rate_mbps` MB/s.
struct SlowLink {
    child: Child,
    port: u16,
}

impl SlowLink {
    fn start(upstream: u16, rate_mbps: u32) -> SlowLink {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new("python3")
            .arg(root.join("scripts/latency-proxy.py"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream}")])
            .args(["--latency-ms", "2", "--rate", &rate_mbps.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let link = SlowLink { child, port };
        assert_eq!(line.trim(), "ready", "latency proxy did not start");
        link
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 6 MB manifest over a 2 MB/s link with `AWS_TIMEOUT=2s`: 3 s each
/// way, longer than an attempt. It was never written (each attempt timed
/// out; the backup failed at its end) nor read; now it is written in one
/// PUT with a timeout scaled to it and read in 512 KiB parts.
#[test]
fn a_manifest_longer_to_transfer_than_an_attempt_is_written_and_read_back_over_a_slow_link() {
    let g = Garage::single();
    let link = SlowLink::start(g.nodes[0].s3_port, 2);
    let mut vars = g.env(0);
    vars.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    vars.push((
        "AWS_ENDPOINT_URL".into(),
        format!("http://127.0.0.1:{}", link.port),
    ));
    vars.push(("AWS_TIMEOUT".into(), "2s".into()));
    let b = S3Backend::open(&format!("s3://{BUCKET}/large"), &vars).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..6_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let key = "backups/vm/20260101T000000Z.json";

    let t = Instant::now();
    assert!(b.put_new(key, &data).unwrap());
    let put = t.elapsed();
    let t = Instant::now();
    let got = b.get(key, 1 << 30).unwrap().expect("the manifest");
    let get = t.elapsed();
    assert!(got == data, "the manifest read back differs");
    eprintln!("6 MB at 2 MB/s: PUT {put:?}, GET {get:?}");
    // Each took longer than an attempt may: the link was the limit.
    assert!(put > Duration::from_secs(2), "{put:?}");
    assert!(get > Duration::from_secs(2), "{get:?}");
    assert_eq!(b.retries(), 0);
    // Create-only still: an existing manifest is not replaced.
    assert!(!b.put_new(key, &data[..4_000_000]).unwrap());
    // Over the limit: refused from the headers, at once.
    let t = Instant::now();
    assert!(b.get(key, 1_000_000).is_err());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

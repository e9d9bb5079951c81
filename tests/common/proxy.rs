//! The user-space latency proxy (`scripts/latency-proxy.py`) in front of a
//! loopback object store, so a repository behaves like a remote one.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

pub struct LatencyProxy {
    child: Child,
    pub port: u16,
}

impl LatencyProxy {
    /// Proxies to `127.0.0.1:upstream`, delaying each response by `latency_ms`.
    pub fn start(upstream: u16, latency_ms: u32, bandwidth_mbps: Option<u32>) -> LatencyProxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new("python3");
        cmd.arg(root.join("scripts/latency-proxy.py"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream}")])
            .args(["--latency-ms", &latency_ms.to_string()]);
        if let Some(b) = bandwidth_mbps {
            cmd.args(["--bandwidth-mbps", &b.to_string()]);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let p = LatencyProxy { child, port };
        assert_eq!(line.trim(), "ready", "latency proxy did not start");
        p
    }

    /// S3 settings `vars` with the endpoint pointed at this proxy.
    pub fn route(&self, mut vars: Vec<(String, String)>) -> Vec<(String, String)> {
        vars.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
        vars.push((
            "AWS_ENDPOINT_URL".into(),
            format!("http://127.0.0.1:{}", self.port),
        ));
        vars
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

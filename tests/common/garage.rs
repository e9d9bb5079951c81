//! Real Garage object-store nodes on loopback for the S3 tests. The guard
//! kills every node when dropped, even if the test panicked.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY_ID: &str = "GK0123456789abcdef01234567";
const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub const BUCKET: &str = "recoverfs-test";

pub fn garage_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GARAGE_BIN") {
        return p.into();
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let cargo_bin = home.join(".cargo/bin/garage");
    if cargo_bin.exists() {
        return cargo_bin;
    }
    "garage".into()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Node {
    child: Option<Child>,
    pub config: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    pub log: PathBuf,
}

pub struct Garage {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
}

impl Garage {
    pub fn single() -> Garage {
        Self::start(1)
    }

    /// `n` nodes, replication factor `n`, one bucket and one key.
    pub fn start(n: usize) -> Garage {
        let bin = garage_bin();
        assert!(
            Command::new(&bin)
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false),
            "garage is not installed ({}): `make test` installs it with cargo install",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("recoverfs-garage")
            .tempdir()
            .unwrap();
        let secret: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let mut nodes = vec![];
        for i in 0..n {
            let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
            let ndir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&ndir).unwrap();
            let config = ndir.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = {n}
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "recoverfs-test-admin"
"#,
                    d = ndir.display()
                ),
            )
            .unwrap();
            let log = ndir.join("garage.log");
            let mut node = Node {
                child: None,
                config,
                s3_port,
                rpc_port,
                log,
            };
            node.spawn();
            nodes.push(node);
        }
        let g = Garage { dir, nodes };
        g.wait_ready();
        g.setup(n);
        g
    }

    fn cli(&self, node: usize, args: &[&str]) -> String {
        let o = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.nodes[node].config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "garage {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..self.nodes.len() {
            loop {
                let ok = Command::new(garage_bin())
                    .arg("-c")
                    .arg(&self.nodes[i].config)
                    .arg("status")
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "garage node {i} did not start: {}",
                    self.nodes[i].log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn setup(&self, n: usize) {
        let ids: Vec<String> = (0..n)
            .map(|i| {
                self.cli(i, &["node", "id", "-q"])
                    .trim()
                    .split('@')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        for (i, id) in ids.iter().enumerate().skip(1) {
            self.cli(
                0,
                &[
                    "node",
                    "connect",
                    &format!("{id}@127.0.0.1:{}", self.nodes[i].rpc_port),
                ],
            );
        }
        for (i, id) in ids.iter().enumerate() {
            self.cli(
                0,
                &["layout", "assign", "-z", &format!("dc{i}"), "-c", "1G", id],
            );
        }
        self.cli(0, &["layout", "apply", "--version", "1"]);
        self.cli(
            0,
            &["key", "import", "--yes", "-n", "recoverfs", KEY_ID, SECRET],
        );
        // The layout may take a moment to reach every node.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = Command::new(garage_bin())
                .arg("-c")
                .arg(&self.nodes[0].config)
                .args(["bucket", "create", BUCKET])
                .output()
                .unwrap();
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bucket create failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.cli(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                BUCKET,
                "--key",
                "recoverfs",
            ],
        );
    }

    /// Environment for recoverfs to reach node `i`.
    pub fn env(&self, i: usize) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
            (
                "AWS_ENDPOINT_URL".into(),
                format!("http://127.0.0.1:{}", self.nodes[i].s3_port),
            ),
            ("AWS_REGION".into(), "garage".into()),
        ]
    }

    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }
}

impl Node {
    fn spawn(&mut self) {
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        if std::thread::panicking() {
            for (i, n) in self.nodes.iter().enumerate() {
                eprintln!("---- garage node {i} log ----\n{}", n.log_text());
            }
        }
    }
}

//! Test hosts in network namespaces: a veth pair with the daemon's end in
//! the root namespace and the host's end inside, on addresses from the
//! benchmarking range 198.18.0.0/15. Removed on drop, even when the test
//! fails.

use std::process::Command;

pub struct Host {
    pub name: String,
    /// The host's own address, inside its namespace.
    pub addr: String,
    /// The address it reaches the daemon at (root namespace end).
    pub server: String,
    /// The root namespace end of its link.
    outer: String,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 is installed");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Host {
    /// Host number `n` (1..=250) of a test: 198.18.N.2 inside, 198.18.N.1
    /// on the server's side.
    pub fn new(n: u8) -> Host {
        let name = format!("rfs{}-{n}", std::process::id() % 100_000);
        let (outer, inner) = (
            format!("rv{}o{n}", std::process::id() % 10_000),
            format!("rv{}i{n}", std::process::id() % 10_000),
        );
        let host = Host {
            name: name.clone(),
            addr: format!("198.18.{n}.2"),
            server: format!("198.18.{n}.1"),
            outer: outer.clone(),
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &name]);
        ip(&["addr", "add", &format!("{}/24", host.server), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{}/24", host.addr),
            "dev",
            &inner,
        ]);
        ip(&["-n", &name, "link", "set", &inner, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        host
    }

    /// Another address on the server's side of this host's link
    /// (198.18.N.`last`), e.g. for one export point each; the host reaches
    /// it directly.
    pub fn add_server_addr(&self, last: u8) -> String {
        let a = format!("198.18.{}.{last}", self.addr.split('.').nth(2).unwrap());
        ip(&["addr", "add", &format!("{a}/32"), "dev", &self.outer]);
        a
    }

    /// Starts a command inside the host, in the background.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Runs `f` on a thread that has joined the host's network namespace,
    /// so sockets it opens (e.g. the Rust NFS client's) are the host's.
    /// What `f` returns may keep using those sockets from any thread.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns on a descriptor we own, for this thread only
            // (a network namespace is per task); no memory is touched.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// Runs a command inside the host.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

//! The agent container: one small ext4 image holding the static agent
//! binary (`/recoverfs`, this very program built with `+crt-static`),
//! `/agent.json` and optional application hooks (`/hooks/NAME/pre` and
//! `/hooks/NAME/post`). Built without mounting anything (`mke2fs -d`),
//! without a journal (it is only ever attached read-only), and renamed
//! into place whole, so a VM attaching it sees the old or the new image,
//! and VMs that have it attached keep theirs. Rebuilding it is how the
//! agent is updated: the next attachment runs the new version.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::util::validate_name;

pub const CONFIG_FORMAT: u32 = 1;
/// The stream protocol the agent speaks (`agent.json`'s `server.protocol`).
pub const PROTOCOL: u32 = 1;
/// Where `make agent` puts the static binary, relative to the target dir.
pub const STATIC_BUILD: &str = "x86_64-unknown-linux-gnu/agent/recoverfs";

/// `agent.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    pub format: u32,
    /// The container's version: what `agent-backup` reports and records.
    pub version: String,
    /// The agent binary's own version.
    pub binary_version: String,
    pub built: String,
    /// Hook names (`hooks/NAME/{pre,post}`).
    pub hooks: Vec<String>,
    /// What the backup server expects: the stream protocol and frame bounds.
    pub server: serde_json::Value,
}

impl AgentConfig {
    pub fn load(container: &Path) -> Result<AgentConfig> {
        let p = container.join("agent.json");
        let b = std::fs::read(&p).ctx(|| format!("read {}", p.display()))?;
        let c: AgentConfig = serde_json::from_slice(&b)
            .map_err(|e| Error::corrupt(format!("{} is malformed ({e})", p.display())))?;
        if c.format != CONFIG_FORMAT {
            return Err(Error::invalid(format!(
                "{}: unknown format {}",
                p.display(),
                c.format
            )));
        }
        Ok(c)
    }
}

pub struct BuildOptions {
    pub output: PathBuf,
    /// The static agent binary; default: [`find_agent_binary`].
    pub binary: Option<PathBuf>,
    /// Default: the binary's version.
    pub version: Option<String>,
    /// A directory of hooks: `NAME/pre`, `NAME/post` (either may be absent).
    pub hooks: Option<PathBuf>,
}

/// The static agent binary: `RECOVERFS_AGENT_BINARY`, else `make agent`'s
/// output in the target directory this program runs from, else this
/// program itself if it is static.
pub fn find_agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RECOVERFS_AGENT_BINARY") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().ctx(|| "find this program".into())?;
    let mut candidates = vec![];
    // target/debug/recoverfs or target/release/recoverfs
    if let Some(target) = me.parent().and_then(Path::parent) {
        candidates.push(target.join(STATIC_BUILD));
    }
    candidates.push(me);
    for c in &candidates {
        if c.is_file() && is_static_elf(c).unwrap_or(false) {
            return Ok(c.clone());
        }
    }
    Err(Error::not_found(
        "no static agent binary: run `make agent` (a static glibc build of recoverfs) or pass --agent-binary",
    ))
}

/// Whether `p` is an x86-64 ELF executable without a program interpreter
/// (statically linked: it runs in any guest).
pub fn is_static_elf(p: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).ctx(|| format!("open {}", p.display()))?;
    let mut h = [0u8; 64];
    if f.read_exact_at(&mut h, 0).is_err() || &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return Ok(false);
    }
    let machine = u16::from_le_bytes([h[18], h[19]]);
    let phoff = u64::from_le_bytes(h[0x20..0x28].try_into().expect("8"));
    let phentsize = u16::from_le_bytes([h[0x36], h[0x37]]) as u64;
    let phnum = u16::from_le_bytes([h[0x38], h[0x39]]) as u64;
    if machine != 62 || phentsize < 4 || phnum > 4096 {
        return Ok(false);
    }
    for i in 0..phnum {
        let mut t = [0u8; 4];
        f.read_exact_at(&mut t, phoff + i * phentsize)
            .ctx(|| format!("read {}", p.display()))?;
        if u32::from_le_bytes(t) == 3 {
            return Ok(false); // PT_INTERP: dynamically linked
        }
    }
    Ok(true)
}

/// Builds the container image at `opts.output` (replacing it atomically).
pub fn build(opts: &BuildOptions) -> Result<AgentConfig> {
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => find_agent_binary()?,
    };
    if !is_static_elf(&binary)? {
        return Err(Error::invalid(format!(
            "{} is not a static x86-64 executable: the agent must run in any guest (build it with `make agent`)",
            binary.display()
        )));
    }
    let out =
        std::path::absolute(&opts.output).ctx(|| format!("resolve {}", opts.output.display()))?;
    let dir = out
        .parent()
        .filter(|d| d.is_dir())
        .ok_or_else(|| Error::not_found(format!("no directory for {}", out.display())))?;
    let tree = tempfile::Builder::new()
        .prefix(".recoverfs-agent-tree.")
        .tempdir_in(dir)
        .ctx(|| format!("create a directory in {}", dir.display()))?;
    let root = tree.path().join("root");
    std::fs::create_dir(&root).ctx(|| format!("create {}", root.display()))?;
    copy_exec(&binary, &root.join("recoverfs"))?;
    let mut hooks = vec![];
    if let Some(hd) = &opts.hooks {
        for d in std::fs::read_dir(hd).ctx(|| format!("hooks directory {}", hd.display()))? {
            let d = d.ctx(|| format!("hooks directory {}", hd.display()))?;
            let name = d.file_name().to_string_lossy().into_owned();
            if !d.path().is_dir() {
                continue;
            }
            validate_name("hook name", &name)?;
            let target = root.join("hooks").join(&name);
            std::fs::create_dir_all(&target).ctx(|| format!("create {}", target.display()))?;
            let mut any = false;
            for stage in ["pre", "post"] {
                let src = d.path().join(stage);
                if src.is_file() {
                    copy_exec(&src, &target.join(stage))?;
                    any = true;
                }
            }
            if !any {
                return Err(Error::invalid(format!(
                    "hook {name} in {} has neither a pre nor a post script",
                    hd.display()
                )));
            }
            hooks.push(name);
        }
    }
    hooks.sort();
    let cfg = AgentConfig {
        format: CONFIG_FORMAT,
        version: opts
            .version
            .clone()
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
        binary_version: env!("CARGO_PKG_VERSION").to_string(),
        built: crate::util::rfc3339(crate::util::now_unix()),
        hooks,
        server: serde_json::json!({
            "protocol": PROTOCOL,
            "max_data_frame": super::stream::MAX_DATA,
            "max_meta_frame": super::stream::MAX_META,
        }),
    };
    std::fs::write(
        root.join("agent.json"),
        serde_json::to_vec_pretty(&cfg).expect("json"),
    )
    .ctx(|| "write agent.json".into())?;
    let bytes = dir_bytes(&root)?;
    // Room for metadata; whole MiB.
    let size_kib = ((bytes + (bytes / 8) + (8 << 20)) >> 20) << 10;
    let img = tree.path().join("agent.img");
    let o = Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "^has_journal",
            "-L",
            "rfs-agent",
        ])
        .args(["-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&img)
        .arg(format!("{size_kib}k"))
        .output()
        .ctx(|| "run mke2fs (e2fsprogs)".into())?;
    if !o.status.success() {
        return Err(Error::new(
            crate::error::ErrorKind::Io,
            format!(
                "mke2fs failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ));
    }
    let f = std::fs::File::open(&img).ctx(|| format!("open {}", img.display()))?;
    f.sync_all().ctx(|| format!("fsync {}", img.display()))?;
    std::fs::rename(&img, &out).ctx(|| format!("rename to {}", out.display()))?;
    crate::util::fsync_dir(dir)?;
    Ok(cfg)
}

fn copy_exec(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(src, dst).ctx(|| format!("copy {}", src.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755))
        .ctx(|| format!("chmod {}", dst.display()))
}

fn dir_bytes(d: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(d).ctx(|| format!("list {}", d.display()))? {
        let e = e.ctx(|| format!("list {}", d.display()))?;
        let m = e
            .metadata()
            .ctx(|| format!("stat {}", e.path().display()))?;
        n += if m.is_dir() {
            dir_bytes(&e.path())?
        } else {
            m.len()
        } + 4096;
    }
    Ok(n)
}

/// The `agent.json` of a built container image, read without mounting
/// (`debugfs`).
pub fn read_config(image: &Path) -> Result<AgentConfig> {
    let o = Command::new("debugfs")
        .args(["-R", "cat /agent.json"])
        .arg(image)
        .output()
        .ctx(|| "run debugfs (e2fsprogs)".into())?;
    serde_json::from_slice(&o.stdout).map_err(|_| {
        Error::invalid(format!(
            "{} is not an agent container (no agent.json inside; build one with `recoverfs agent build`)",
            image.display()
        ))
    })
}

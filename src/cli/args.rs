//! The command line as clap parses it: every command, its flags and
//! their help. What each command does is in the sibling modules, reached
//! from [`super::run`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::{agent, boot, key, maint, pins, precopy, profile, staging, upload};

#[derive(Parser)]
#[command(
    name = "recoverfs",
    version,
    about = "Instant VM recovery: boot a VM straight from its backup"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub keys: key::KeyArgs,
}

#[derive(clap::Args, Clone)]
pub struct SocketArg {
    /// Control socket of the daemon (default: the socket of the first running daemon).
    #[arg(long, env = "RECOVERFS_SOCKET")]
    pub socket: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create an empty repository (backup also creates one on first use).
    Init {
        #[arg(long)]
        repo: String,
        /// Encrypt chunks and authenticate manifests and profiles with a
        /// new key, written to --key-file (optionally protected by the
        /// passphrase of --passphrase-file or RECOVERFS_PASSPHRASE).
        #[arg(long)]
        encrypt: bool,
    },
    /// Keys of encrypted repositories.
    Key {
        #[command(subcommand)]
        cmd: key::KeyCmd,
    },
    /// Back up raw disk images (regular files or block devices) as disk0,
    /// disk1, ...; or, with --session, a VM running from a recovery session,
    /// from its changed blocks alone.
    Backup {
        #[arg(long, required_unless_present = "session")]
        repo: Option<String>,
        #[arg(long, required_unless_present = "session")]
        vm: Option<String>,
        /// VM configuration as a JSON object file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Chunk size: a power of two from 64K to 8M.
        #[arg(long, default_value = "1M")]
        chunk_size: String,
        /// Raw image files (or block devices), or NBD exports as
        /// `nbd://HOST[:PORT]/EXPORT` (port 10809 by default) or `nbd+unix:///EXPORT?socket=PATH`
        /// (zero extents the server reports are skipped), one per disk.
        #[arg(required_unless_present = "session")]
        images: Vec<PathBuf>,
        /// Back up this VM's live recovery session through the daemon: the
        /// blocks it changed since its base backup are read from staging,
        /// the rest are the base's chunks; guest writes pause only for the
        /// freeze.
        #[arg(long, conflicts_with_all = ["repo", "vm", "config", "images", "chunk_size"])]
        session: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
        /// With --session: print the daemon's JSON reply.
        #[arg(long)]
        json: bool,
    },
    /// Back up running QEMU VMs from one common snapshot time, busiest
    /// first (full backups, or with --incremental what changed since each
    /// VM's previous backup). Exits non-zero if any VM failed; the others
    /// are backed up all the same.
    BackupVms {
        #[arg(long)]
        repo: String,
        /// A VM and its QMP socket (`-qmp unix:PATH,server=on,wait=off`);
        /// repeatable.
        #[arg(long = "vm", value_name = "NAME=QMP_SOCKET", required = true)]
        vms: Vec<String>,
        /// The guest agent socket of a VM given with --vm, to freeze its
        /// filesystems at the snapshot (application-consistent); repeatable.
        #[arg(long = "agent", value_name = "NAME=QGA_SOCKET")]
        agents: Vec<String>,
        /// Back up VM NAME although its QEMU's UUID (or name) is not the one
        /// its newest backup was taken from (the VM was re-created); without
        /// it that VM fails, as another VM's socket would; repeatable.
        #[arg(long = "new-identity", value_name = "NAME")]
        new_identity: Vec<String>,
        /// VMs read at the same time.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Chunk size: a power of two from 64K to 8M.
        #[arg(long, default_value = "1M")]
        chunk_size: String,
        /// Seconds over which each VM's write rate is measured.
        #[arg(long, default_value_t = 1.0)]
        rate_window: f64,
        /// Read only what changed since each VM's newest backup (QEMU's
        /// dirty bitmap); a full read, with the reason, where it cannot.
        #[arg(long)]
        incremental: bool,
        /// Read order by measured write rate: busiest-first releases the
        /// costliest views soonest; idle-first exists to measure that.
        #[arg(long, value_enum, default_value_t)]
        order: crate::vmbackup::ReadOrder,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The agent container: `agent build`, `agent run` (in the guest),
    /// `agent --version [--container IMAGE]`.
    #[command(disable_version_flag = true)]
    Agent {
        #[command(subcommand)]
        cmd: Option<agent::AgentCmd>,
        /// Show the container's agent version.
        #[arg(long)]
        version: bool,
        /// The container image (or, in the guest, its mounted directory).
        #[arg(long, env = "RECOVERFS_AGENT_CONTAINER")]
        container: Option<PathBuf>,
    },
    /// File backups of running VMs through the agent container: attach it
    /// (QMP), run the agent (guest agent), stream the files into the
    /// repository, detach. Exits non-zero if any VM failed.
    AgentBackup {
        #[arg(long)]
        repo: String,
        /// A VM: its QMP socket and its guest agent socket; repeatable.
        #[arg(
            long = "vm",
            value_name = "NAME=QMP_SOCKET[,qga=QGA_SOCKET]",
            required = true
        )]
        vms: Vec<String>,
        /// Paths in the guest (a directory brings everything under it).
        #[arg(long, num_args = 1.., required = true)]
        paths: Vec<String>,
        /// Application hooks to run around the copy (pre: quiesce, post:
        /// resume); repeatable. The agent copies the files (reflink, else
        /// plain, on their filesystem) while quiesced and streams after
        /// `post`.
        #[arg(long = "hooks", value_name = "NAME")]
        hooks: Vec<String>,
        /// If the guest lacks the free space for that copy, stream while
        /// the application stays quiesced (default: fail before `pre`).
        #[arg(long)]
        allow_quiesced_stream: bool,
        /// The agent container image.
        #[arg(long, env = "RECOVERFS_AGENT_CONTAINER", default_value = agent::DEFAULT_CONTAINER)]
        container: PathBuf,
        /// VMs backed up at the same time (one container instance each).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Seconds the agent's stream may stay silent.
        #[arg(long, default_value_t = 300)]
        idle_timeout: u64,
        /// Seconds one VM's backup may take in all (a guest that keeps
        /// the stream trickling is stopped then).
        #[arg(long, default_value_t = 24 * 3600)]
        max_duration: u64,
        #[arg(long)]
        json: bool,
    },
    /// Copy files of a file backup back into a running VM through the
    /// agent container: to their place in the guest, or under --to.
    AgentRestore {
        #[arg(long)]
        repo: String,
        /// The VM: its QMP socket and its guest agent socket.
        #[arg(long = "vm", value_name = "NAME=QMP_SOCKET,qga=QGA_SOCKET")]
        vm: String,
        /// A file backup id (default: the VM's newest file backup).
        #[arg(long)]
        backup: Option<String>,
        /// A path in the backup (a directory brings everything under it).
        path: String,
        /// A directory in the guest to restore under.
        #[arg(long, conflicts_with = "in_place")]
        to: Option<String>,
        /// Restore each file to its own place in the running guest,
        /// replacing what is there (without --to, this must be said).
        #[arg(long)]
        in_place: bool,
        #[arg(long, env = "RECOVERFS_AGENT_CONTAINER", default_value = agent::DEFAULT_CONTAINER)]
        container: PathBuf,
        #[arg(long, default_value_t = 300)]
        idle_timeout: u64,
        /// Seconds the restore may take in all.
        #[arg(long, default_value_t = 24 * 3600)]
        max_duration: u64,
    },
    /// Single files from a file backup, or from a disk backup without
    /// booting it: ls, cat, restore.
    Files {
        #[command(subcommand)]
        cmd: agent::FilesCmd,
    },
    /// Between scheduled backups of a running QEMU VM, copy the blocks it
    /// changes into the repository in rounds, so the backup at --backup-at
    /// reads only what changed since the last round.
    Precopy(precopy::PrecopyArgs),
    /// Pre-copy for a recovered VM: the daemon stores the blocks its guest
    /// changes as chunks in the background, throttled by the guest's I/O
    /// latency, so `backup --session` reads only the rest. Prints the
    /// uploader's state.
    Upload(upload::UploadArgs),
    /// List VMs and their backups.
    List {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove the backups a retention policy does not keep (PBS prune
    /// semantics; see the README); `gc` then frees their chunks.
    Forget(maint::ForgetArgs),
    /// Remove every chunk no backup, profile or running backup references
    /// (waits for running backups; safe against backups from other hosts).
    Gc(maint::GcArgs),
    /// Read and check every chunk referenced by the selected backups.
    Verify {
        #[arg(long)]
        repo: String,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        backup: Option<String>,
        /// Set damaged chunks aside (under quarantine/, holding the gc
        /// lock), so the next backup that reads those bytes stores them
        /// again and the backups naming them read again.
        #[arg(long)]
        repair: bool,
        /// With --repair: how long to wait for running backups (seconds).
        #[arg(long, default_value_t = 300, requires = "repair")]
        wait: u64,
    },
    /// Hold a FUSE connection across a crash of its daemon (started by
    /// `serve`; see `export::fuse::keeper`).
    #[command(hide = true)]
    FuseKeeper {
        /// The keeper's abstract socket name.
        #[arg(long)]
        name: String,
        /// The staging it keeps the connection for (shown, not used).
        #[arg(long)]
        staging: Option<std::path::PathBuf>,
    },
    /// End a FUSE mount kept for a crashed daemon that will not be
    /// restarted: its keeper lets the connection go, and disk I/O waiting
    /// on the mount fails with ENOTCONN (refused while a daemon serves the
    /// staging: stop it instead).
    FuseLetGo {
        /// The staging directory of the daemon that died.
        #[arg(long)]
        staging: std::path::PathBuf,
    },
    /// Run the recovery datastore in the foreground.
    Serve {
        /// Repository: a directory or s3://BUCKET[/PREFIX].
        #[arg(long)]
        repo: String,
        /// Local staging: missing, empty, or a staging directory of this
        /// repository (anything else is refused untouched); made mode 0700.
        /// Export points without their own staging= stage here.
        #[arg(long)]
        staging: PathBuf,
        /// A staging directory (--staging or a point's staging=) whose disk
        /// is gone for good: found empty, it is set up afresh and the
        /// repository's pins of the sessions this host kept there are
        /// removed (their guests' later writes are lost; recover starts
        /// from the backups). Without it, such a directory is refused as
        /// not mounted. Give it once, not in a unit file. Repeatable.
        #[arg(long, value_name = "DIR")]
        staging_lost: Vec<PathBuf>,
        /// An empty directory to mount the datastore on.
        #[arg(long)]
        mount: PathBuf,
        /// Control socket (default: STAGING/control.sock). Created mode 0600
        /// (0660 with --socket-group); only root, the daemon's user and that
        /// group's members are served.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Let members of this group use the control socket too (put the
        /// socket in a directory they can reach).
        #[arg(long, value_name = "GROUP")]
        socket_group: Option<String>,
        /// Let another user (a hypervisor running as its own user) open the
        /// disks; needs --owner.
        #[arg(long)]
        allow_other: bool,
        /// Owner of the VM directories and disk files (mode 0700/0600): the
        /// user the hypervisor runs as, e.g. 64055:64055 or libvirt-qemu:kvm.
        #[arg(long, value_name = "UID:GID")]
        owner: Option<String>,
        /// Repository GETs in flight at once per export point (the fetch
        /// engine's limit; they cost a few threads, not one each).
        #[arg(long, default_value_t = 64, alias = "fetch-workers")]
        fetches_in_flight: usize,
        /// FUSE event-loop threads, 1 to 64 (the keeper carries one device
        /// file per thread, at most 64).
        #[arg(long, default_value_t = 4, value_parser = fuse_threads)]
        fuse_threads: usize,
        /// Let the kernel read fully staged (or relocated) disks itself on
        /// read-only FUSE opens, bypassing the daemon. While such an open
        /// lasts, a writable open of that disk (starting its VM) is refused
        /// with EBUSY.
        #[arg(long)]
        fuse_passthrough: bool,
        /// Do not keep the FUSE connection across a crash of the daemon. By
        /// default a keeper process (`recoverfs fuse-keeper`) holds it: if
        /// the daemon dies, guests' disk I/O waits (as on a hard NFS mount)
        /// until the next `serve` of this staging answers it; without it,
        /// the mount dies with the daemon and guests get ENOTCONN.
        #[arg(long, env = "RECOVERFS_NO_FUSE_KEEPER")]
        no_fuse_keeper: bool,
        /// Write blocks fetched from the repository into staging past the
        /// page cache (O_DIRECT): less CPU per cold GiB (no copy into new
        /// page-cache pages), but a staged block read again then comes
        /// from the disk, and can wait behind other writes to it (another
        /// VM's fsync).
        #[arg(long)]
        stage_fills_direct: bool,
        /// Seconds between background flushes of the staging maps.
        #[arg(long, default_value_t = 2.0)]
        flush_interval: f64,
        /// Most bytes each staging directory may hold (e.g. 64G, at least
        /// 1M; never more than its filesystem holds): staged blocks the
        /// guest never changed are evicted, least recently used first, and
        /// fetched again when read; changed blocks never are.
        #[arg(long, value_name = "SIZE")]
        staging_max: Option<String>,
        /// Bytes to keep free on each staging filesystem (e.g. 1G): lowers
        /// the limit, with or without --staging-max; refused if it leaves
        /// less than 1M of the filesystem.
        #[arg(long, value_name = "SIZE")]
        staging_reserve: Option<String>,
        /// Serve NFSv3 on ADDR (port 2049 unless given) and a portmapper on
        /// port 111 of ADDR; repeatable.
        #[arg(long, value_name = "ADDR[:PORT]")]
        nfs: Vec<String>,
        /// Client networks allowed on the network exports, NFS and NBD over
        /// TCP (and every export point's): CIDR or address, repeatable;
        /// default: loopback only. Others are refused (NBD: disconnected
        /// before the greeting).
        #[arg(long, value_name = "CIDR", visible_alias = "nfs-allow")]
        allow: Vec<String>,
        /// Do not map root on other hosts to nobody (ESXi needs root access).
        #[arg(long)]
        nfs_no_root_squash: bool,
        /// Answer every NFS write FILE_SYNC (for clients that never compare
        /// write verifiers, like QEMU's libnfs 4.0).
        #[arg(long)]
        nfs_write_through: bool,
        /// NFS connections open at once per listening address and port;
        /// more are closed at once (with a warning at most once a minute).
        #[arg(long, value_name = "N", default_value_t = crate::export::nfs::NfsOptions::MAX_CONNECTIONS)]
        nfs_max_connections: usize,
        /// Serve NBD on ADDR (port 10809 unless given) or on a Unix socket;
        /// repeatable. Over TCP only --allow networks are served; a Unix
        /// socket is mode 0600. No TLS: keep it on loopback or a trusted
        /// network.
        #[arg(long, value_name = "ADDR[:PORT]|unix:PATH")]
        nbd: Vec<String>,
        /// A datastore export point with its own address (NFS on PORT,
        /// default 2049, and 111; NBD on nbd-port, default 10809), its own
        /// I/O queue of at most max-inflight requests (default 64) and,
        /// with staging=DIR (absolute; checked like --staging; not nested
        /// in the mount, --staging or another point's), its own staging
        /// directory, e.g. on another disk (default: --staging). Points may
        /// share a staging= directory. Repeatable. Replaces --nfs/--nbd;
        /// --allow and the NFS options apply to every point.
        #[arg(
            long,
            value_name = "NAME,listen=ADDR[,port=P][,nbd-port=P][,staging=DIR][,max-inflight=N]"
        )]
        export_point: Vec<String>,
        /// Connections one hypervisor host may hold (one per datastore it
        /// mounts; ESXi's default SunRPC.MaxConnPerIP is 4).
        #[arg(long, default_value_t = 4)]
        max_connections_per_host: usize,
        /// Benchmarks only: add this many ms before every chunk read, so a
        /// local repository behaves like a remote one.
        #[arg(long, hide = true)]
        repo_delay_ms: Option<f64>,
        #[command(flatten)]
        prefetch: profile::PrefetchArgs,
    },
    /// Manage operational profiles: what a VM reads while it boots.
    Profile {
        #[command(subcommand)]
        cmd: profile::ProfileCmd,
    },
    /// Which daemon serves or keeps which VM, as the repository records it:
    /// list the pins, drop those of a host lost for good.
    Pins {
        #[command(subcommand)]
        cmd: pins::PinsCmd,
    },
    /// Kept sessions in staging directories: list them, drop one.
    Staging {
        #[command(subcommand)]
        cmd: staging::StagingCmd,
    },
    /// Start (or resume) a recovery session and print the disk paths. Without
    /// --backup, the VM's kept staging is resumed unless its backup is gone;
    /// a VM with kept staging of several backups is refused (name one).
    Recover {
        #[command(flatten)]
        socket: SocketArg,
        /// One or more VMs, placed one after another (each placement sees
        /// the load of those before it).
        #[arg(required = true)]
        vm: Vec<String>,
        #[arg(long)]
        backup: Option<String>,
        /// The hypervisor that will run the VM (its address or a name that
        /// resolves to it): placement counts its connections.
        #[arg(long)]
        host: Option<String>,
        /// `auto` (placement decides) or an export point's name.
        #[arg(long, default_value = "auto")]
        export_point: String,
        /// Place on the named export point even if the host needs a
        /// connection over its limit for it.
        #[arg(long)]
        force: bool,
        /// Recover even if another daemon serves the VM or keeps its
        /// staging: a second writable copy, without that one's writes
        /// (refused otherwise).
        #[arg(long)]
        second_copy: bool,
        /// Show every export point's figures and which rule chose.
        #[arg(long)]
        explain: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show the export points: sessions, hosts, queue, predicted latency.
    ExportPoints {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        json: bool,
    },
    /// Show sessions and per-disk figures.
    Status {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        json: bool,
    },
    /// Boot a recovering VM under QEMU, with live progress.
    Boot {
        #[command(flatten)]
        socket: SocketArg,
        vm: String,
        /// The backup to recover if the VM is not served yet (as `recover
        /// --backup`); default: its kept staging, else the newest backup.
        #[arg(long)]
        backup: Option<String>,
        /// How QEMU reaches the disks: the FUSE files, or the daemon's NFS or
        /// NBD export. NBD is recommended: it reconnects, so a daemon restart
        /// is invisible to the guest.
        #[arg(long, value_enum, default_value = "fuse")]
        via: boot::Via,
        /// Console text that means the VM is up.
        #[arg(long)]
        marker: Option<String>,
        /// Seconds to wait for the marker.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Save the serial console here.
        #[arg(long)]
        console: Option<PathBuf>,
        /// Do not echo the serial console.
        #[arg(long)]
        quiet: bool,
        /// Give QEMU a QMP monitor on this Unix socket (for `backup-vms`
        /// and operators): `-qmp unix:PATH,server=on,wait=off`.
        #[arg(long)]
        qmp: Option<PathBuf>,
        /// The guest agent's socket (the VM always gets a guest-agent
        /// channel and a virtio-scsi controller, for `agent-backup`).
        #[arg(long)]
        qga: Option<PathBuf>,
    },
    /// Prove a backup boots: throwaway recovery, QEMU without network, marker or timeout.
    VerifyBoot {
        #[arg(long)]
        repo: String,
        vm: String,
        #[arg(long)]
        backup: Option<String>,
        /// Console text that proves the boot (default: the config's verify_marker, else "login:").
        #[arg(long)]
        marker: Option<String>,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Save the serial console here.
        #[arg(long)]
        console: Option<PathBuf>,
    },
    /// Copy a recovering VM's disks to primary storage while it runs, then
    /// cut over; or pause / resume / cancel a relocation under way.
    Relocate {
        #[command(flatten)]
        socket: SocketArg,
        vm: String,
        /// Directory on primary storage; disks go to DIR/VM/diskN.raw.
        #[arg(long, required_unless_present_any = ["pause", "resume", "cancel"])]
        to: Option<PathBuf>,
        /// Pause the relocation under way (kept across a daemon restart).
        #[arg(long, conflicts_with_all = ["to", "rate", "force", "resume", "wait"])]
        pause: bool,
        /// Resume a paused relocation where it stopped, retry a failed one
        /// once its cause is fixed (the target full, say; blocks already
        /// copied are kept), or reopen one a restarted daemon could not
        /// (its target was unreachable); with --wait, also follows one
        /// that runs (after a Ctrl-C of a wait).
        #[arg(long, conflicts_with_all = ["to", "rate", "force"])]
        resume: bool,
        /// Cancel the relocation for good (refused after cutover): the
        /// copier stops, no restart resumes it, and the target files it
        /// created are removed (never a file that was there before).
        /// `--to` another directory may follow.
        #[arg(long, conflicts_with_all = ["to", "rate", "force", "pause", "resume", "wait"])]
        cancel: bool,
        /// With --cancel: leave the partial target files in place.
        #[arg(long, requires = "cancel")]
        keep_target: bool,
        /// Copy rate limit in MB/s (raised up to 4x if the guest out-writes it).
        #[arg(long)]
        rate: Option<f64>,
        /// Accept a non-empty DIR/VM: its disk files are emptied first
        /// (symbolic links are refused even then).
        #[arg(long)]
        force: bool,
        /// Show progress and return at cutover.
        #[arg(long)]
        wait: bool,
    },
    /// End a recovery session (staging is kept unless --discard). Exits
    /// non-zero if a disk's staging had failed (its last writes may be lost).
    Release {
        #[command(flatten)]
        socket: SocketArg,
        vm: String,
        #[arg(long)]
        discard: bool,
        /// With --discard: only the staging kept from backup ID (the
        /// session served, if it is another, stays).
        #[arg(long, value_name = "ID", requires = "discard")]
        backup: Option<String>,
    },
}

/// `--fuse-threads`: refused outside 1..=`keeper::MAX_FDS` instead of being
/// clamped, so the count asked for is the count served.
fn fuse_threads(arg: &str) -> Result<usize, String> {
    let max = crate::export::fuse::keeper::MAX_FDS;
    match arg.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {max}")),
    }
}

#[cfg(test)]
mod fuse_threads_tests {
    use super::*;

    #[test]
    fn fuse_threads_beyond_what_the_keeper_carries_is_refused_not_clamped() {
        assert_eq!(fuse_threads("64"), Ok(64));
        assert_eq!(fuse_threads("1"), Ok(1));
        for bad in ["0", "65", "1000", "-1", "four"] {
            let e = fuse_threads(bad).unwrap_err();
            assert!(e.contains("1 to 64"), "{bad}: {e}");
        }
    }
}

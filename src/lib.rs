//! # recoverfs: instant VM recovery
//!
//! An administrator boots a dead VM straight from its backup: the backup
//! is exposed as live, writable virtual disk files on a FUSE mount while
//! the data is copied to local staging on demand.
//!
//! ## Data flow
//!
//! ```text
//!  backup:  image ──read──▶ fixed chunks ──BLAKE3, zstd──▶ repo/chunks/…   then repo/backups/<vm>/<id>.json
//!
//!  guest / hypervisor
//!        │ read/write/fsync on MOUNT/<vm>/diskN.raw
//!        ▼
//!  fs (fuser, N event threads) ── all blocks local? ──yes──▶ volume::read/write inline
//!        │ no                                                   │
//!        ▼                                                      ▼
//!  fuse-io worker pool ──▶ volume ──claim block (in-flight table: one fetch per block)
//!                                  │ owner                    │ waiter (promotes a queued job)
//!                                  ▼                          ▼
//!       prefetch::Scheduler (one per daemon; on-demand > profile > relocation > readahead)
//!            N fetch workers: repo.read_chunk ─▶ verify digest ─▶ pwrite staging
//!                                  └──▶ presence bit set ──▶ waiters wake, pread staging
//!  guest reads ──▶ tracker (first reads → profile recording) ──▶ stream detector (readahead)
//!  per session: prefetch feeder thread ──▶ profile blocks within the horizon ──▶ scheduler
//!  control API (tokio, Unix socket) ──▶ session::Datastore (recover / status / release / relocate)
//!  relocate: copier thread ──▶ volume::read_source ──▶ target file; pass after pass, then
//!            pause writes ──▶ final pass ──▶ fsync ──▶ commit `switched` ──▶ volume serves the target
//! ```
//!
//! Guest writes go only to staging. A write first sets the block's changed
//! bit durably, fills a partly covered missing block from the backup, then
//! writes the staging data file. `fsync` syncs the data file, then writes
//! the presence map (from a snapshot taken before the data sync), then the
//! changed map, and only then answers.
//!
//! ## On-disk formats
//!
//! Repository (a directory; keys mirror paths):
//! * `repo.json` — `{format, version, id, created}`; `id` ties staging to it.
//! * `chunks/<hex[0..4]>/<hex>` — one zstd frame of the chunk's plain
//!   bytes; `<hex>` is the BLAKE3 of those bytes. All-zero chunks are never
//!   stored. Every read decompresses and re-hashes.
//! * `backups/<vm>/<id>.json` — `{"checksum": blake3(manifest bytes),
//!   "manifest": {format, vm, id, created, config, disks: [{name, size,
//!   chunk_size, chunks: [hex | null], stored_bytes, new_bytes}]}}`.
//! * `profiles/<vm>.json` — the VM's operational profile, sealed the same
//!   way under `"profile"`: `{format, vm, recordings: [{recorded, backup,
//!   source, disks: [{index, block_size, accesses: [[block, ms, chunk|null]]}]}]}`,
//!   the last 5 recordings, each a session's first reads in order.
//!
//! Staging (a directory, mode 0700, locked by the serving daemon):
//! * `staging.json` — the repository id it belongs to.
//! * `sessions/<vm>/<backup>/diskN.data` — sparse file, disk-sized.
//! * `…/diskN.present`, `…/diskN.changed` — 64-byte header (magic
//!   `RFSBMAP1`, kind, block size, block count) then one bit per block.
//! * `…/session.json` — geometry; written last when a session is created.
//! * `…/diskN.copied` — relocation: blocks whose copy on the target is
//!   synced (same header, kind 3); `…/relocation.json` — target, pass,
//!   and `switched`, the cutover's commit point.
//!
//! ## What is durable when
//!
//! | state | durable when | after a crash before that |
//! |---|---|---|
//! | chunk object | before `backup` writes the manifest (temp, fsync, rename, fsync dir) | temp file ignored; chunk rewritten next time |
//! | manifest | on `backup` exit (same sequence, never replaces) | backup invisible, as if never started |
//! | fetched block data | at the next flush (≤ `--flush-interval`) or guest fsync | presence bit not on disk: block refetched |
//! | presence bit | after the data sync of that flush | block refetched (reads backup content) |
//! | changed bit | before the guest's data is written | — (never missing; may over-report) |
//! | guest write data | at the guest's fsync/fdatasync/flush reply | block reads as backup or as a write that happened |
//! | session staging | kept at `release`, deleted by `release --discard` | resumed by the next `recover` |
//! | copied bit (relocation) | set after the target data is fsynced; cleared durably before a guest write lands | block copied again |
//! | profile recording | at `release`, daemon shutdown or the end of the recording window (one atomic object write) | the session's recording is lost; older ones stay |
//! | cutover | `relocation.json` `switched: true` written after the final pass and target fsync, with writes paused | relocation resumes from staging |

pub mod api;
pub mod boot;
pub mod cli;
pub mod daemon;
pub mod error;
pub mod fs;
pub mod metrics;
pub mod pool;
pub mod prefetch;
pub mod relocate;
pub mod repo;
pub mod session;
pub mod staging;
pub mod util;
pub mod verify_boot;
pub mod volume;

#[cfg(test)]
mod crash_consistency;

pub use error::{Error, ErrorKind, Result};

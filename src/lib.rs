//! # recoverfs: instant VM recovery
//!
//! An administrator boots a dead VM straight from its backup: the backup
//! is exposed as live, writable virtual disks (files on a FUSE mount, an
//! NFSv3 datastore, NBD exports) while the data is copied to local staging
//! on demand.
//!
//! ## Data flow
//!
//! ```text
//!  backup:  image ──read──▶ fixed chunks ──BLAKE3, zstd──▶ repo/chunks/…   then repo/backups/<vm>/<id>.json (create-only)
//!
//!  guest / hypervisor
//!        │                            │                                   │
//!  export::fuse (MOUNT/<vm>/…)   export::nfs (TCP: portmap, MOUNT,   export::nbd (TCP / Unix:
//!  inode numbers per session     NFSv3; stable handles; allow list,  VM/diskN exports; structured
//!  event threads serve local     root squash; calls on blocking      replies, block status; requests
//!  I/O; a one-block miss is      threads, a one-block READ miss      on blocking threads; a one-block
//!  answered by the fetch engine; replied later; side files)          miss is answered by the engine)
//!  other misses, first writes →       │                                   │
//!  fuse-io pool; fsync → sync         │                                   │
//!        └────────────── disk::Disk (read, write, write-zeroes, discard, flush, block status) ──┘
//!                                     │  (an open NFS client / NBD connection = an open handle)
//!                                     │  each export point: its own NFS/NBD address, sessions, staging dir, I/O queue
//!                                     │  (placement::IoQueue: guest requests = sync class, first; relocation
//!                                     │  copies, profile/readahead fetches = async class) and fetch scheduler;
//!                                     │  session::Datastore::place picks the point of a new recovery
//!                                     ▼
//!  volume ──claim block (in-flight table: one fill per block; writes claim in ascending block order)
//!        │ owner                        │ waiter (promotes a queued job)
//!        ▼                              ▼
//!  prefetch::Scheduler (one per export point; on-demand > profile > relocation > readahead)
//!       CPU thread: admit ─▶ engine runtime: async GET (≤ --fetches-in-flight) ─▶ CPU thread:
//!       open_chunk (decrypt, decompress, verify digest) ─▶ readers reply from the fetched bytes (no read-back)
//!         ─▶ staging write (io gate: never after release) ─▶ presence bit set ─▶ the fill ends (writers proceed)
//!  staging::io::Storage ── every staging, map, metadata and relocation-target file (tests: faults, power cuts)
//!  guest reads ──▶ tracker (first reads → profile recording) ──▶ stream detector (readahead)
//!  per session: prefetch feeder thread ──▶ profile blocks within the horizon ──▶ scheduler
//!  control API (tokio, Unix socket, peer credentials checked) ──▶ session::Datastore
//!       recover / release / discard / relocate of one VM under that VM's lock; the session
//!       table is locked only for lookups, never across repository I/O
//!  relocate: copier thread ──▶ up to 64 block reads in flight (staging, or unstaged
//!            relocation-class fetches) ──▶ target file in order; committer thread per batch:
//!            target sync, staging flush (guest-changed blocks), then copied bits; pass after
//!            pass (pausable), then pause writes ──▶ final pass ──▶ syncs
//!            ──▶ rename relocation.json `switched` (the commit) ──▶ every disk serves its target
//!  live backup (backup --session): pause writes ──▶ flush, freeze the dirty map ──▶ resume
//!            ──▶ read frozen blocks (staging / target; cow if the guest overwrote them first)
//!            ──▶ store chunks ──▶ manifest (base's chunk ids for the rest) ──▶ since.json (the commit)
//!  running QEMU VMs (qemu::*): qmp (commands, events, blockstats), guest_agent (fsfreeze),
//!            fleece (bitmap + copy-before-write + snapshot-access, exported on QEMU's NBD
//!            server), nbd (client: structured replies, block status) ──▶ backup writer
//!  agent container (agent::*): QMP attach (chardev + virtserialport, blockdev-add ro +
//!            scsi-hd) ──▶ guest-exec: mount, `recoverfs agent run` (pre, copy, post, frames) ──▶
//!            content-defined chunks ──▶ detach ──▶ catalog files/<vm>/<id>-files.json
//!  files: catalog entries + chunks, or a disk backup's filesystem mounted read-only (its
//!            journal replayed into scratch staging) from a loop device over a throwaway recovery
//!  serve without the repository (repo::unconfirmed): its identity from staging.json's copy;
//!            every request checks repo.json (same id) until the store answers as itself
//!  backup-vms (vmbackup): write rates (query-blockstats) ──▶ fsfreeze ──▶ stop every VM ──▶ one
//!            view per disk ──▶ one snapshot time ──▶ cont, thaw ──▶ busiest first, --jobs at a time:
//!            vmbackup::read (base:allocation, dirty bitmap) ──▶ store chunks ──▶ manifest ──▶ release
//!            that VM's views; `backup nbd://…` reads any NBD export the same way
//!  precopy: rounds (QMP transaction: new bitmap, freeze the last) ──▶ live disk: the raw
//!            image file (pread) or over NBD ──▶ store chunks ──▶ state.json (checkpoints); at --backup-at: backup-vms with
//!            the recorded chunks + newest round bitmap as its base; throttled by guest load
//!  session uploader (session::upload): dirty, staged, not uploaded blocks ──▶ store chunks
//!            ──▶ diskN.uploaded-G entry (set-then-recheck of the write stamp); a guest write
//!            zeroes the entry first; backup --session takes valid entries, reads the residue
//! ```
//!
//! Guest writes go only to staging. A write first sets its blocks' changed
//! bits durably (group-committed: one map sync per round, shared by
//! concurrent first writes), fills a partly covered missing block from the
//! backup, then
//! writes the staging data file. `fsync` syncs the data file, then writes
//! the presence map (from a snapshot taken before the data sync), then the
//! changed map, and only then answers; concurrent fsyncs share one sync.
//! The first failed sync of a disk is sticky: every later flush and write of
//! that disk fails with EIO until the session is released (reads go on).
//!
//! Staging may be bounded (`serve --staging-max`, `staging::budget`; the
//! limit never above what the staging's filesystem can hold): each
//! fetch first takes room in its staging directory's budget; over the limit
//! unchanged, idle blocks are evicted (CLOCK), their presence bits cleared
//! durably before their holes are punched (`volume::evict`); changed blocks
//! never are. When nothing can be evicted a read's fetch reads through (its
//! bytes answer the read, nothing is staged) and a write that needs room
//! fails ENOSPC. Prefetch fills only below the low watermark and evicts no
//! other disk's blocks. A new recovery is admitted only where its expected
//! working set fits (a profile that does not fit below that watermark is
//! admitted with a warning).
//!
//! ## On-disk formats
//!
//! Repository (a directory or an S3 bucket; keys mirror paths):
//! * `space-reserve` (local repositories) — 256 KiB that a lock write
//!   failing for space gives back, so `forget`/`gc` can run on a full
//!   filesystem (`gc::forget_and_gc_free_space_on_a_repository_filesystem_filled_to_the_last_block`).
//! * `repo.json` — `{format, version, id, created}`; `id` ties staging to it;
//!   an encrypted repository adds `encryption: {aead, chunk_id, mac,
//!   fingerprint}` (`repo::crypto`): chunk ids are then keyed BLAKE3,
//!   chunk objects `RFSE` ‖ 24-byte nonce ‖ XChaCha20-Poly1305 of the zstd
//!   frame (the id as associated data), and sealed documents carry `mac`
//!   (keyed BLAKE3 of field ‖ 0 ‖ body) instead of `checksum`.
//! * `chunks/<hex[0..4]>/<hex>` — one zstd frame of the chunk's plain
//!   bytes, or, when zstd would not shrink them, the plain bytes ‖
//!   `rfs-raw1` (served in place, `repo::chunk`); `<hex>` is the BLAKE3 of
//!   those bytes. All-zero chunks are never stored. Every read is bounded
//!   in size, decompresses (or strips the trailer) and re-hashes.
//! * `backups/<vm>/<id>.json` — `{"checksum": blake3(manifest bytes),
//!   "manifest": {format, vm, id, created, config, disks: [{name, size,
//!   chunk_size, chunks: [hex | n], stored_bytes, new_bytes}]}}`, at most
//!   256 disks of at most 64 TiB and 2^28 chunks in all (`repo::limits`);
//!   in `chunks` a number `n` is a run of `n` zero chunks (format 2;
//!   format 1, still read, has one `null` per zero chunk; see
//!   `repo::chunk_index`). Created only if absent; on a store that ignores
//!   conditional PUTs the id gets a random suffix.
//! * `files/<vm>/<id>-files.json` — a file backup (`agent-backup`), sealed
//!   the same way under `"catalog"` (in an encrypted repository encrypted
//!   whole instead: `{"aead", "catalog": base64}`): `{format, vm, id, created, source:
//!   {agent_version, paths, hooks}, entries: [{path, kind, mode, uid, gid,
//!   mtime, mtime_nsec, size, target, chunks: [{digest, len}]}],
//!   file_bytes, stored_bytes, new_bytes}`; file contents are
//!   content-defined chunks (FastCDC) in the same `chunks/`. Created only
//!   if absent, after every chunk it names and after the agent container
//!   is detached (`agent`, `repo::catalog`).
//! * `profiles/<vm>.json` — the VM's operational profile, sealed the same
//!   way under `"profile"`: `{format, vm, recordings: [{recorded, backup,
//!   source, disks: [{index, block_size, accesses: [[block, ms, chunk|null]]}]}]}`,
//!   the last 5 recordings, each a session's first reads in order.
//! * `locks/backup-<random>.json`, `locks/gc-<random>.json` — `{kind,
//!   host, pid, what, started}`, rewritten every 60 s by their holder
//!   (`repo::locks`: why backups and `gc` cannot race).
//! * `pins/<vm>/<hash>.json` — `{vm, backups, host, staging, staging_id,
//!   state, written}`: backups a recovery session uses, which `forget` keeps
//!   (`repo::pins`), and who serves or keeps which VM: a new recovery of
//!   a VM another daemon's pin names is refused unless `--second-copy`
//!   (`session::tests::elsewhere`). `<hash>` is of the staging directory's
//!   id and the session's directory name, so a pin is a daemon's by that
//!   id, not by host name (a renamed host keeps its pins; two hosts of one
//!   name and the same paths never share one); pins written before ids
//!   (none, keyed by host and path) are read, go by host and path, and are
//!   replaced when their session is pinned again.
//!
//! Staging (a directory, mode 0700, locked by the serving daemon; a
//! directory that is neither empty nor a staging directory is refused
//! before anything in it changes). `--staging`, and each export point's own
//! `staging=DIR` if it has one, all laid out alike; a session lives in the
//! staging of the point it was created at and never moves:
//! * `staging.json` — the repository id it belongs to, and the directory's
//!   own random id (made once, written atomically before any pin names it;
//!   a directory from before ids gets one at its next open).
//! * `mount.json` — where its daemon last mounted (main staging only): a
//!   daemon started there with another `--mount` detaches the dead mount
//!   a killed one left (`staging::last_mount`).
//! * `sessions/<vm>/<backup>/manifest.json` — the backup's manifest as
//!   recovered, so a kept session resumes while the repository is down.
//! * `…/diskN.data` — sparse file, disk-sized (opened `O_NOATIME`).
//! * `…/diskN.present`, `…/diskN.changed` — 64-byte header (magic
//!   `RFSBMAP1`, kind, block size, block count) then one bit per block.
//! * `…/diskN.live` — the presence map as written, unsynced, trusted only
//!   in the same boot (magic `RFSLIVE1`, block size, block count, boot id
//!   hash, epoch, poisoned flag; see `staging::live`).
//! * `…/session.json` — geometry; written last when a session is created.
//! * `…/diskN.copied` — relocation: blocks whose copy on the target, and
//!   the staging it was read from, are synced (same header, kind 3);
//!   `…/relocation.json` — target, pass, and `switched`, the commit point
//!   (and which target files it created, for a cancel).
//! * Live backups (`session::backup`): `…/since.json` — `{generation,
//!   base}`, the backup the dirty maps are relative to (absent: generation
//!   0, the session's own backup, whose dirty map is `diskN.changed`);
//!   `…/base-G.json` — that backup's manifest; `…/diskN.dirty-G` — blocks
//!   written since it (same header, kind 4); `…/diskN.cow` — freeze-time
//!   bytes of frozen blocks the guest overwrote while a backup runs
//!   (sparse, never synced, removed after).
//! * Session uploader (`session::upload`): `…/diskN.uploaded-G` — per
//!   block of generation G, the chunk stored for it while no guest write
//!   landed since (64-byte header `RFSUPLD1`, 64-byte entries with a keyed
//!   check; see `staging::uploaded`); `…/upload.json` — its settings while
//!   it is on.
//!
//! ## What is durable when
//!
//! | state | durable when | after a crash before that | proven by |
//! |---|---|---|---|
//! | chunk object | before `backup` writes the manifest (temp, fsync, rename, fsync dir; an S3 PUT) | temp file ignored; chunk rewritten next time | `crash::a_backup_killed_midway_leaves_no_backup_and_the_next_one_succeeds` |
//! | manifest | last, on `backup` exit, created only if absent (`link(2)`; S3 `If-None-Match`) | backup invisible, as if never started | `crash::a_backup_killed_midway_leaves_no_backup_and_the_next_one_succeeds`, `repo::s3::tests::two_writers_of_one_manifest_key_never_both_succeed` |
//! | session files | manifest copy and maps before `session.json`, all before the first I/O is served | no `session.json`: session created afresh (a damaged or unreadable one is an error naming it, nothing removed; so is a resumed session's missing presence or changed map, or a data file of the wrong size, never recreated); whatever a new session finds in its directory is garbage (data file emptied, maps zeroed, same-boot mirror not trusted, a live backup's, uploader's or relocation's state and NFS side files removed) | `crash_consistency::power_cuts_and_daemon_crashes_during_guest_writes_fetches_and_flushes_keep_every_acknowledged_write`, `staging::tests::a_session_dir_half_removed_by_an_interrupted_discard_never_serves_its_old_presence_bits`, `staging::tests::a_damaged_session_json_is_an_error_naming_it_and_removes_nothing`, `staging::tests::a_resumed_session_with_a_missing_changed_or_present_map_is_refused_naming_it`, `session::tests::a_new_session_never_shows_side_files_a_half_removed_session_left` |
//! | fetched block data | at the next flush (≤ `--flush-interval`) or guest fsync | presence bit not on disk: block refetched | `crash_consistency::power_cuts_and_daemon_crashes_during_guest_writes_fetches_and_flushes_keep_every_acknowledged_write`, `crash::staged_blocks_are_never_zeros_after_a_crash` |
//! | presence bit | after the data sync of that flush, from a snapshot taken before it; never after a failed sync | block refetched (reads backup content) | `crash_consistency::power_cuts_and_daemon_crashes_during_guest_writes_fetches_and_flushes_keep_every_acknowledged_write`, `volume::durability_tests::a_failed_staging_sync_fails_every_later_flush_and_write_and_persists_no_presence` |
//! | presence bit, same boot (`diskN.live`) | written (never synced) once the block's bytes are, before the fill ends (a write to the block waits for that; readers may be answered before, from the fetched, verified bytes, which a crash only makes be fetched again); trusted by a daemon restarted in the same boot unless a sync (of the data file, or of the mirror itself) failed; rewritten in place when a full staging filesystem takes no new file | a daemon crash (`kill -9`, which keeps the page cache) loses no completed write, flushed or not: those blocks are kept, not refetched; after a reboot, power cut or failed sync it is ignored and the disk's epoch (NFS verifier) changes | `crash_consistency::power_cuts_and_daemon_crashes_during_guest_writes_fetches_and_flushes_keep_every_acknowledged_write` (daemon-crash states), `staging::live::tests::unsynced_bits_count_after_a_kill_and_keep_the_epoch`, `staging::live::tests::a_power_cut_or_a_poisoned_mirror_is_ignored_and_changes_the_epoch`, `staging::live::tests::a_mirror_whose_own_writeback_failed_is_not_trusted_and_changes_the_epoch`, `staging::live::tests::on_a_full_filesystem_the_mirror_is_rewritten_in_place_and_keeps_its_bits_and_epoch`, `nfs::every_acknowledged_write_survives_kill9_with_the_same_verifier_and_old_handles` |
//! | changed bit | before the guest's data is written (synced), to staging or, after a cutover, to the target; group-committed: one write and one sync per round for every concurrent setter, a setter returns only once a completed sync covered its bits | — (never missing; may over-report) | `staging::bitmap::tests::concurrent_durable_setters_share_syncs_and_return_only_once_their_bit_is_synced`, `staging::bitmap::tests::a_failed_group_sync_fails_its_setters_and_the_next_round_writes_their_bits`, `volume::durability_tests::concurrent_first_writes_share_changed_map_syncs`, `crash_consistency::power_cuts_and_daemon_crashes_during_guest_writes_fetches_and_flushes_keep_every_acknowledged_write`, `crash_consistency::power_cuts_and_daemon_crashes_during_relocation_and_cutover_never_mix_versions` (also after the cutover) |
//! | map words a restarted daemon reads (`diskN.present`, `.changed`, `.dirty-G`, `.uploaded-G`) | synced when opened, before any is trusted: after a `kill -9` they come from the page cache, maybe written by a group commit or snapshot that died before its sync, and a bit counted durable is never synced again; the staging data is synced before the same-boot mirror is trusted, and a failure there distrusts it (new epoch) | — | `staging::bitmap::tests::a_bit_a_killed_daemon_wrote_but_never_synced_is_synced_before_it_counts_as_durable`, `staging::uploaded::tests::an_entry_a_killed_daemon_cleared_without_a_sync_stays_cleared_after_a_power_cut`, `volume::durability_tests::a_writeback_error_a_killed_daemon_never_saw_makes_the_next_one_trust_no_unsynced_block` |
//! | guest write data | at the reply to the guest's fsync/fdatasync/flush (grouped: one sync for all waiting) | block reads as backup or as a write that happened | `crash_consistency::power_cuts_and_daemon_crashes_during_guest_writes_fetches_and_flushes_keep_every_acknowledged_write`, `crash::kill9_during_fsynced_writes_loses_nothing_acknowledged`, `fsx::fsx_finds_no_error_on_a_recovered_disk_with_64k_chunks` |
//! | a failed sync | never: sticky, every later flush and write of the disk fails with EIO until release, and a daemon stopped while it is served exits non-zero naming it | — | `faults::a_failed_writeback_of_staging_fails_every_later_fsync_and_shows_in_status`, `faults::a_daemon_stopped_with_a_failed_disk_exits_non_zero_naming_it` |
//! | dirty-since-backup bit (`diskN.changed` in generation 0, `diskN.dirty-G` after a live backup) | with the changed bit, before the guest's data is written (synced); while a live backup runs, in the next generation's map as well | — (never missing; may over-report) | `crash_consistency::power_cuts_and_daemon_crashes_during_live_backups_leave_every_change_in_the_dirty_map` (power cuts and kills during two live backups while the guest writes: every block that differs from the base `since.json` names has its bit), `volume::freeze_tests::a_write_blocked_at_the_gate_during_the_freeze_lands_only_in_the_next_map`, `session::tests::live_backup::a_restart_keeps_the_live_backups_base_and_removes_an_interrupted_ones_leftovers` |
//! | live backup (`backup --session`) | chunks, then the manifest (create-only), then `base-G.json` and `since.json` (the commit point); only then does the next generation's map become current | before the manifest: no backup; the old generation's map covers every write; the next start removes the leftovers. Between manifest and `since.json`: the backup exists and the session stays relative to the old base (the next backup reads more, misses nothing) | `crash_consistency::power_cuts_and_daemon_crashes_during_live_backups_leave_every_change_in_the_dirty_map`, `session_backup::a_daemon_killed_during_a_live_backup_leaves_no_backup_and_the_next_one_succeeds`, `session::tests::live_backup::a_restart_keeps_the_live_backups_base_and_removes_an_interrupted_ones_leftovers` |
//! | freeze-time bytes of a frozen block | copied to `diskN.cow` (unsynced: void after a crash) before a guest write lands on the block while the backup has not read it; read back only after a sync covered the copy (a failed writeback may drop the page and leave a hole), the first failed sync failing the backup | the backup has no manifest yet: void | `volume::freeze_tests::writes_to_frozen_blocks_after_the_freeze_leave_the_backup_reader_the_freeze_time_bytes`, `volume::freeze_tests::a_frozen_blocks_copy_whose_writeback_failed_is_never_read_back_into_a_backup`, `session::tests::live_backup::guest_writes_while_a_live_backup_stores_are_left_to_the_next_backup` |
//! | `backup-vms` backup of one VM | chunks, then its manifest (create-only) once every view of the VM was read in full; its views are released after | a VM that dies or fails mid-read: views torn down, no manifest; the other VMs' manifests stand. A copy-before-write store that fails breaks the snapshot, not the guest's writes: that VM fails. SIGINT/SIGTERM: every VM resumed and thawed, views closed, no manifest; a killed run's leftovers are removed by the next | `vmbackup::tests::failures::a_vm_killed_after_the_snapshot_gets_no_manifest_and_the_others_are_backed_up`, `vmbackup::tests::failures::a_failing_copy_before_write_store_breaks_the_snapshot_not_the_guests_writes_and_the_backup_fails`, `vmbackup::tests::failures::a_signal_during_the_first_read_fails_every_vm_through_its_cleanup_resumed_and_without_views_or_manifests`, `vm_backup::sigint_during_backup_vms_ends_it_through_its_cleanup_with_one_error_and_the_vm_running`, `vmbackup::tests::runs::a_run_after_a_killed_run_removes_its_leftovers_and_backs_up`, `vm_backup::three_writing_vms_back_up_at_one_instant_busiest_first_and_every_restored_image_boots` |
//! | incremental base (QEMU dirty bitmap) | not durable: lives in QEMU, named in the manifest; the old bitmap is disabled at the snapshot and removed only after the new manifest | QEMU restarted, or the bitmap left disabled (no longer recording): a full read, said why; a failed incremental re-enables the old bitmap and merges its own into it in one QMP transaction; if that fails both go and the report warns | `vmbackup::tests::incremental::an_incremental_whose_bitmap_died_with_a_restarted_qemu_reads_everything_and_says_why`, `vmbackup::tests::incremental::an_incremental_whose_base_bitmap_no_longer_records_reads_everything_and_says_why`, `vmbackup::tests::incremental::a_failed_incremental_merges_its_bitmap_into_the_previous_one_so_the_next_reads_every_write_since_the_last_backup`, `vmbackup::tests::incremental::a_failed_incrementals_bitmap_goes_back_in_one_transaction_so_a_guest_write_during_the_hand_back_is_read_by_the_next`, `vmbackup::tests::incremental::a_failed_hand_back_removes_both_bitmaps_says_so_and_the_next_incremental_reads_everything` |
//! | copied bit (relocation) | set by the batch's committer after the target data is synced (not staging: an unchanged block reads the backup's bytes after a crash whatever staging lost, a changed one is copied again), only if no guest write started since the copier took the block's stamp before reading it, however long the batch waited; cleared in memory before a guest write lands (no sync on the guest's path); the file may keep vouching for a block written since, so whenever a relocation is opened every block both changed (durable before any write's data, on every write path) and copied is taken as not copied (see `relocate::copy`, "Revoking a copy"), after the map is installed, so that a write racing a reopen in a running daemon (`relocate --resume`) is revoked by one side or the other; and on every reopen before the cutover a target file not of the disk's size, or with a hole over a whole copied block that has backup data and was never changed (`SEEK_HOLE`/`SEEK_DATA`, one call per hole), has its disk's copied map replaced by an empty one (atomically, synced) before the copier starts, so a target re-created or truncated since is copied again from scratch; after the cutover one not of the disk's size is not served | block copied again (every changed block, after any restart) | `crash_consistency::power_cuts_and_daemon_crashes_during_relocation_and_cutover_never_mix_versions`, `crash_consistency::a_crash_after_guest_writes_over_copied_blocks_never_leaves_them_vouched_for_by_the_copied_file`, `relocate::tests::copy::a_guest_write_racing_a_batch_in_flight_is_never_recorded_as_copied_with_the_old_bytes`, `relocate::tests::reopen::a_resumed_relocation_whose_target_file_was_emptied_to_holes_copies_that_disk_again`, `relocate::tests::reopen::a_resumed_relocation_whose_target_file_has_another_length_copies_that_disk_again`, `relocate::tests::reopen::a_resumed_relocation_trusts_copies_over_a_target_whose_only_holes_are_backup_holes`, `relocate::tests::reopen::a_switched_relocation_whose_target_file_has_another_length_is_not_served`, `relocate::a_relocation_resumed_over_a_re_created_tmpfs_target_copies_the_disk_again`, `relocate::tests::reopen::a_guest_write_racing_a_reopen_in_a_running_daemon_is_never_trusted_as_copied`, `relocate::tests::copy::guest_writes_all_through_a_pipelined_copy_leave_the_target_equal_to_every_write`, `volume::copy_read_tests::a_copy_read_of_a_changed_block_reads_the_write` |
//! | relocation paused | `relocation.json` replaced (atomically, synced) with `paused: true` before the pause is acknowledged; the copier abandons reads in flight and commits only blocks it wrote whole (target synced before their bits); no cutover while paused | relocation resumes paused; bits recorded are true | `relocate::tests::pause::a_pause_stops_the_copier_promptly_keeps_every_copied_bit_true_and_resume_finishes`, `relocate::tests::pause::a_relocation_paused_before_a_restart_stays_paused_until_resumed`, `relocate::a_paused_relocation_stops_copying_stays_paused_across_kill9_and_resumes_to_a_complete_target` |
//! | copied bits of a run of holes (relocation) | set (stamp, still-a-hole check: no backup data, not staged and not claimed by a write still completing; set, recheck) after the target reads zeros there durably: a target this daemon emptied (truncated and sized, synced) does; a resumed target is punched over the run and synced first; then only the bitmap words of the batch are written and synced | run taken again | `crash_consistency::a_power_cut_after_a_written_hole_was_copied_never_leaves_the_hole_marked_copied_over_the_copy`, `relocate::tests::reopen::a_resumed_relocation_zeroes_holes_over_stale_target_bytes_before_marking_them_copied`, `relocate::tests::copy::a_write_into_a_hole_still_completing_is_never_recorded_copied_as_a_hole`, `large_disks::a_sparse_4_tib_disk_relocates_in_seconds_with_bounded_memory_and_the_target_matches_the_image` |
//! | relocation start | every existing target file checked (no link, not held by another relocation's or session's lock: `--force` takes an exclusive OFD lock on each first, refused with none emptied), and no `vm.json` in `DIR/VM`, before the session's earlier relocation state is removed durably and before targets are emptied (created or truncated under an exclusive lock then held shared while open, 0600, no symlinks); target names synced before `relocation.json`; a start that fails leaves no disk tracking its copies; an owner id written into `DIR/VM/.recoverfs-relocation` (synced with the names) before the record: a later relocation into the directory replaces it, and from then on this one is never resumed into those files nor removes them; a reopen before the cutover takes each file's lock exclusive first | no relocation resumes | `relocate::relocating_with_force_over_an_old_file_leaves_no_old_byte_and_follows_no_link`, `relocate::tests::start::a_relocation_whose_record_cannot_be_written_leaves_no_disk_tracking_copies`, `relocate::tests::start::a_force_relocation_never_empties_a_target_another_relocation_serves_from`, `relocate::tests::start::a_relocation_never_empties_a_target_file_locked_by_another_open`, `relocate::tests::start::a_force_relocation_over_a_complete_relocated_copy_is_refused_saying_what_to_do`, `staging::io::tests::a_target_lock_keeps_other_opens_from_emptying_but_leaves_qemus_lock_bytes_free`, `session::tests::relocation::a_failed_relocation_can_be_started_again_with_force_over_its_own_target`, `crash_consistency::power_cuts_and_daemon_crashes_during_relocation_and_cutover_never_mix_versions`, `session::tests::relocation::an_earlier_relocation_never_resumes_into_or_removes_files_a_later_one_took_with_force`, `relocate::tests::reopen::a_reopen_of_a_relocation_whose_target_another_open_holds_is_not_resumed` |
//! | relocation cancel | refused once the cutover began (decided under the state lock the copier's switch takes); copier stopped and joined; `relocation.json` removed and its directory synced (the commit) before anything else: then the disks stop tracking copies, copied maps and the target files the relocation created (recorded in `relocation.json` as `created`) are removed; a failure to remove the record cancels nothing (`failed`, copier stopped) | recorded whole, resumes; or not recorded (at worst unreferenced partial target files without `vm.json`) | `crash_consistency::a_crash_anywhere_in_a_cancel_leaves_the_relocation_either_resumable_or_cancelled`, `relocate::tests::cancel::a_cancel_whose_record_cannot_be_removed_leaves_the_relocation_resumable_and_can_be_asked_again`, `relocate::tests::cancel::a_cancel_mid_copy_is_durable_and_a_relocation_elsewhere_then_copies_what_the_vm_sees`, `relocate::tests::cancel::a_cancel_after_the_cutover_is_refused_and_changes_nothing`, `relocate::tests::cancel::a_cancel_asked_while_the_cutover_runs_is_refused_and_the_cutover_completes`, `relocate::a_cancelled_relocation_is_not_resumed_and_one_elsewhere_then_equals_the_disk` |
//! | cutover | `relocation.json` renamed with `switched: true` after the final pass, target syncs and `vm.json`, writes paused; after the rename every disk switches (cannot fail); if the rename cannot be synced the disks refuse writes and flushes | relocation resumes from staging; never a mix of disks | `relocate::tests::cutover::a_cutover_whose_commit_fails_leaves_every_disk_on_staging`, `relocate::tests::cutover::a_cutover_whose_commit_cannot_be_made_durable_goes_forward_and_takes_no_new_bytes`, `crash_consistency::power_cuts_and_daemon_crashes_during_relocation_and_cutover_never_mix_versions` |
//! | eviction (bounded staging) | the block's presence bit is cleared in memory (under the exclusive eviction gate), then in `diskN.live` and in `diskN.present` (synced, outside the gate, the block still in the in-flight table) before its hole is punched; never for a changed block; the flush lock keeps an older presence snapshot from being written after it | a crash before the map sync: the bit and the bytes are both still there; after it: the block is fetched again (never zeros) | `crash_consistency::power_cuts_and_daemon_crashes_during_eviction_never_expose_zeros_or_lose_a_write`, `volume::evict::tests::reads_and_writes_racing_the_evictor_always_see_the_model_and_staging_stays_under_its_limit`, `volume::evict::tests::a_staged_read_or_write_never_waits_for_an_evictions_map_sync`, `bounded_staging::a_guest_reading_a_disk_4x_the_staging_limit_keeps_working_under_it_and_every_changed_block_survives`, `bounded_staging::a_guest_read_of_an_unstaged_block_when_staging_is_full_of_changed_blocks_is_answered_not_failed` |
//! | read through FUSE passthrough (`serve --fuse-passthrough`, off by default) | — (reads only): granted to `O_RDONLY` opens of a disk whose staging holds every backed-up block, or after a cutover (then the target); while one is open the disk evicts nothing, no relocation starts and writable FUSE opens are refused (EBUSY, logged); writes (NBD, NFS) keep passing the volume and its changed-block tracking, before and after cutover | — | `passthrough::a_read_only_open_of_a_fully_staged_disk_passes_through_and_the_daemon_sees_no_read`, `passthrough::without_the_option_a_read_only_open_of_a_fully_staged_disk_reaches_the_daemon_and_never_blocks_a_writer`, `passthrough::eviction_skips_a_disk_open_with_passthrough_and_takes_it_once_closed`, `passthrough::relocation_is_refused_under_a_passthrough_open_and_after_cutover_passthrough_reads_the_target_and_writes_stay_tracked`, `passthrough::a_writable_open_never_passes_through_and_its_writes_are_tracked_as_changed`, `volume::passthrough::tests::a_written_zero_block_whose_presence_bit_was_lost_keeps_direct_readers_away`, `volume::passthrough::tests::no_relocation_starts_under_a_direct_reader_none_is_granted_during_one_and_after_cutover_the_target_is_read` |
//! | session staging | kept at `release` (after `close`, no released fetch writes into it), deleted by `release --discard` or `staging drop`: renamed aside to `.discarding-…` (synced; the commit), then removed | resumed by the next `recover` (found in any staging directory, placed only among the points staging there), from its manifest copy if the repository is down (or does not answer as itself: moved away, an empty mount point); a discard interrupted after its rename is never taken for a session and is finished when the staging directory is next opened | `session::tests::a_recover_waits_for_a_release_and_a_released_fetch_never_lands_in_the_next_session`, `session::tests::a_fully_staged_session_resumes_while_the_repository_is_unreachable`, `session::tests::kept_staging_resumes_while_the_repository_directory_is_missing`, `session::tests::kept_staging_resumes_while_an_empty_directory_stands_in_for_the_repository`, `session::tests::kept_staging_in_a_points_directory_resumes_and_auto_placement_stays_among_the_points_staging_there`, `staging::tests::a_discard_commits_by_renaming_the_session_aside_and_the_next_open_finishes_it` |
//! | NFS UNSTABLE write | at the next COMMIT (or FILE_SYNC write, or flush); kept over a daemon crash; the disk's write verifier (its epoch) changes after a host reboot, and at the next open after a failed staging sync (until then every flush, COMMIT and write of the disk fails with EIO: sticky), so clients resend; not on a restart | lost only with a changed verifier or a failed COMMIT | `nfs::every_acknowledged_write_survives_kill9_with_the_same_verifier_and_old_handles` |
//! | NFS FILE_SYNC/DATA_SYNC write, COMMIT | before the reply (= a guest fsync) | — | `nfs::every_acknowledged_write_survives_kill9_with_the_same_verifier_and_old_handles`, `nfs::write_through_answers_every_write_file_sync` |
//! | NBD write | at the reply to the next FLUSH (any connection), or its own reply with FUA | may be lost; QEMU reconnects and replays what it had in flight | `nbd::a_daemon_crash_is_invisible_to_a_guest_writing_over_nbd` |
//! | side files (NFS) | at COMMIT, a FILE_SYNC write or a size change (SETATTR), in the session's staging; their verifier is new at each daemon start and after any failed side-file write, sync or resize (a writeback error reaches one descriptor only) | as a local file: synced data stays; an UNSTABLE write that may be lost is resent by the client | `nfs::nfs_clients_list_copy_write_and_keep_side_files_while_disks_stay_put`, `nfs::a_failed_side_file_write_changes_the_side_file_verifier_so_clients_resend` |
//! | sessions being served | an `active` marker written at recover (atomically, in the session's staging directory, holding the export point and host it was placed for), the last step of recover that can fail: a recover that fails leaves nothing running (a relocation copier it resumed is stopped and joined, its disks closed and counted as kept staging again); removed at release, after the flushes: if the removal cannot be made durable the session is still released in full (pinned `kept`, frontends told) and the error says it may be served again after a restart | — | `session::tests::recover_faults::a_recover_that_fails_after_resuming_a_relocation_leaves_no_copier_behind`, `session::tests::recover_faults::a_recover_that_fails_after_its_disks_joined_the_staging_budget_leaves_them_counted_as_kept`, `session::tests::recover_faults::a_release_whose_active_marker_cannot_be_removed_durably_still_releases_fully`, `nbd::a_daemon_crash_is_invisible_to_a_guest_writing_over_nbd`, `placement::a_new_vm_goes_where_the_relocation_is_nearly_done_and_stays_there_across_a_restart`, `placement::a_point_staging_on_its_own_disk_keeps_its_vm_there_across_kill9_at_the_same_point_and_handles`, `session::tests::a_restart_serves_each_session_at_the_same_point_from_the_same_staging_directory` |
//! | the repository's identity, for a start without it (`staging.json`: `repo_info`) | replaced atomically (temp, fsync, rename, fsync dir) at each start with a repository that answers, when it differs | the older copy or none; with none, a restart while the repository does not answer is refused as before; with one, `serve` starts and asks nothing else of the store until it answers with that id (`repo::unconfirmed`) | `crash::a_daemon_restarted_after_a_crash_while_its_repository_is_away_serves_what_staging_holds_and_the_rest_once_it_is_back`, `s3::a_daemon_restarted_after_a_crash_while_the_store_is_down_serves_what_staging_holds`, `repo::unconfirmed::tests::nothing_is_written_to_a_store_until_it_answers_as_the_repository` |
//! | chunks a backup needs, against `gc` | a backup holds `locks/backup-*` (written, then `locks/gc-*` looked for) from before it stores or reuses a chunk until its manifest; `gc` deletes only holding `locks/gc-*` with no backup lock seen (written, then looked for); locks rewritten every 60 s, dead after 10 min on the store's clock (against the stamp of the reader's own lock just written; at once when the holder was on this host, boot and pid namespace and its pid is gone or reused); `gc`/`backup` remove their lock on SIGINT/SIGTERM after a manifest or delete batch under way | a dead holder's lock is ignored after 10 min, or removed at once if it was on this host; a holder that could not rewrite its lock for 5 min stops (no manifest, no more deletes), for good even if a later rewrite succeeds | `gc::gc_racing_backups_from_another_process_never_removes_a_chunk_a_manifest_needs` (fails without the protocol), `repo::gc::tests::gc_racing_backups_in_threads_never_removes_a_chunk_a_manifest_needs`, `repo::locks::tests::a_waiting_collector_holds_new_writers_back_so_backups_cannot_starve_it`, `repo::locks::tests::a_writer_whose_lock_was_not_refreshed_for_half_the_stale_time_publishes_nothing`, `repo::locks::tests::a_writer_whose_lock_lapsed_publishes_nothing_even_after_a_later_refresh`, `repo::locks::tests::a_lock_not_refreshed_for_the_stale_time_is_ignored`, `repo::locks::tests::lock_ages_are_read_on_the_stores_clock_so_a_host_clock_ahead_of_it_sees_a_fresh_lock_as_fresh`, `repo::locks::tests::a_lock_of_a_dead_process_on_this_host_is_removed_at_once_and_delays_neither_gc_nor_backup`, `repo::locks::tests::released_locks_are_removed_and_nothing_is_published_or_refreshed_under_them_after`, `gc::sigint_of_a_gc_waiting_for_a_backup_or_of_a_backup_blocked_reading_its_source_leaves_no_lock`, `s3::forget_and_gc_on_s3_remove_only_unreferenced_chunks_and_a_racing_backup_keeps_its_chunks` |
//! | forget | every backup decided before any manifest or catalog is deleted; a VM's disk and file backups are two series, each decided by the policy; only manifests and catalogs (chunks wait for `gc`); a backup a session's pin lists is kept unless `--force`; deletes under a writer lock (no gc meanwhile), then reads the pins again and puts back a backup a session pinned since the decision | some of the removed manifests or catalogs gone, the rest stay: run it again; a crash between delete and put back loses the backup of a session that started during forget's run (that session's status says so) | `repo::forget::tests::thirty_days_of_three_vms_keep_the_readme_policy_table_and_gc_removes_only_unreferenced_chunks`, `repo::forget::tests::file_backups_are_their_own_series_forgotten_by_the_policy_and_gc_frees_their_chunks`, `agent::the_agent_resumes_the_application_before_streaming_and_the_backup_holds_the_quiesced_state` (forget, gc, verify by the binary), `gc::a_backup_a_recovery_session_uses_is_kept_by_forget_unless_forced_and_then_status_says_so`, `repo::forget::tests::a_session_pinned_while_forget_decides_keeps_its_backup` |
//! | session pin (`pins/<vm>/<id>.json`) | keyed by its staging directory's id (in `staging.json`, written atomically before any pin names it) and its session directory's name, not by host name: a renamed host rewrites the same pin, and two hosts of one name and the same paths never overwrite or remove each other's; a pin from before ids (keyed by host and path) is removed after its session's pin is written with one; a new session's written before its staging, then its manifest checked again (gone: no session); rewritten after the session's `active` marker at recover, rewritten at release (kept) and after a live backup, removed after its staging is discarded (rewritten `kept` if the discard fails, the session still released in full); a failed write is logged, and written again by the daemon's 10 s backup check while the session is served | a pin of discarded staging may stay (its backups stay protected; remove it by hand or `--force`); a throwaway recovery's pin (`files`, `verify-boot`) names its process and `forget` removes it once that process is known dead on this host | `gc::a_backup_a_recovery_session_uses_is_kept_by_forget_unless_forced_and_then_status_says_so`, `repo::forget::tests::the_pin_of_a_throwaway_recovery_killed_before_its_cleanup_is_dropped_and_a_live_ones_kept`, `session::tests::a_session_whose_backup_is_forgotten_as_it_pins_it_serves_nothing`, `session::tests::a_session_whose_pin_could_not_be_written_is_pinned_by_the_next_backup_check`, `session::tests::recover_faults::a_release_whose_discard_cannot_be_made_durable_still_releases_fully_and_stays_pinned`, `session::tests::elsewhere::a_daemon_of_the_same_host_name_and_staging_path_keeps_its_own_pin_and_refuses_a_second_copy`, `session::tests::elsewhere::a_renamed_host_resumes_its_own_sessions_and_leaves_no_pin_under_its_old_name`, `session::tests::elsewhere::a_pin_from_before_staging_ids_still_protects_its_backup_and_is_replaced_when_pinned_again`, `staging::tests::a_staging_directory_keeps_one_id_and_one_set_up_before_ids_gets_one_at_its_next_open` |
//! | key file (`init --encrypt`) | written create-only (temp, fsync, link, 0600) before `repo.json`; removed again if no new repository came of it; `key change-passphrase` replaces it atomically | no repository, or the old passphrase still works | `repo::crypto::tests::a_key_file_with_a_passphrase_needs_it_and_can_change_it`, `encryption::tampering_and_wrong_keys_are_refused_by_name_and_the_passphrase_can_change` |
//! | file backup (`agent-backup`) | chunks while the agent's stream arrives, under a writer lock (`gc` sweeps nothing meanwhile; catalogs are a `gc` referrer); the catalog last (create-only), only after the stream's end frame matched (count, bytes, BLAKE3 of every frame), the in-guest agent exited 0 and the container and port were detached | no catalog: as if never started (stored chunks are unreferenced) | `agent::agent_backup_of_a_running_debian_guest_restores_files_byte_for_byte_and_leaves_nothing_attached` (agent killed by its hook, VM killed mid-backup), `agent::stream::tests::a_stream_round_trips_and_every_truncation_is_an_error`, `agent::stream::tests::a_changed_or_dropped_frame_fails_the_end_check`, `repo::catalog::tests::gc_keeps_every_chunk_a_file_backup_references_and_removes_the_rest` |
//! | agent's copy in the guest (`agent-backup --hooks`) | taken while quiesced (metadata and a reflink or plain copy of every file), the application resumed, then streamed from the copy; space checked before `pre` (too little: an error, nothing quiesced, unless `--allow-quiesced-stream`); removed after the stream and on failure | a `.recoverfs-agent-copy.PID` directory left by a killed agent, removed by the next backup of that filesystem | `agent::the_agent_resumes_the_application_before_streaming_and_the_backup_holds_the_quiesced_state` (agent wrote the 32 MiB file after `post`; backup holds the quiesced state; no space; killed agent's copy removed), `agent::guest::copy::tests::the_copy_holds_the_files_as_they_were_and_goes_away_and_too_little_space_is_refused_up_front` |
//! | restored file (`files restore`, `agent-restore`) | whole: temp file, fsync, rename (`files restore` never replaces an existing file), fsync of the directory; then mode, owner, times | the temp file, never a half-written file at the name | `agent::guest::tests::the_agent_streams_a_tree_between_its_hooks_and_it_restores_identically`, `agent::agent_backup_of_a_running_debian_guest_restores_files_byte_for_byte_and_leaves_nothing_attached` |
//! | agent container image | built aside, fsynced, renamed into place: attached VMs keep the old one | the old image | `agent::agent_backup_of_a_running_debian_guest_restores_files_byte_for_byte_and_leaves_nothing_attached` (version 1.0.0 then 1.0.1) |
//! | pre-copied chunk and its record (`precopy`) | chunk objects first, then `state.json` (chunk id and proving round per block) replaced atomically at each checkpoint (≤ 2 s), under a writer lock held for the job's life and through its final backup's publication (`gc` sweeps nothing meanwhile; between runs a recorded chunk that is gone is read again); a round's frozen bitmaps are removed only after the state saying every block is proven by the newer one | chunks stored since the last checkpoint are read again (deduplicated); if QEMU lost a bitmap the state depends on, or the state is damaged, the cycle starts over from the since-backup bitmap, said in the report; never a stale chunk in a backup | `precopy::tests::a_job_stopped_mid_round_resumes_without_reading_recorded_chunks_again`, `precopy::tests::recorded_chunks_garbage_collected_between_runs_are_read_again`, `precopy::tests::lost_pre_copy_state_falls_back_to_the_since_backup_bitmap_and_says_so`, `precopy::tests::direct::a_round_reading_the_image_file_records_the_same_chunks_as_one_reading_the_disk_over_nbd`, `precopy::a_job_killed_mid_round_resumes_without_reading_recorded_chunks_again_and_its_backup_is_exact` |
//! | pre-copy's scheduled backup | as `backup-vms`: chunks, then the manifest (create-only); then the state file is removed; a failed one re-enables the round bitmap and merges its new bitmap into it in one QMP transaction | no backup; the state and round bitmap still cover every write; a new cycle takes no since-backup bitmap that no longer records | `precopy::tests::rounds_leave_the_scheduled_backup_at_most_a_fifth_of_a_plain_incrementals_reads_and_it_restores_like_a_full_backup_of_that_instant`, `precopy::tests::a_failed_scheduled_backup_hands_its_bitmap_back_to_the_round_bitmap_so_a_guest_write_during_the_hand_back_is_in_the_next`, `precopy::tests::a_new_cycle_whose_since_backup_bitmap_no_longer_records_reads_every_block_and_says_why` |
//! | daemon pre-copy job's request (`POST /precopy`) | `STAGING/precopy/<repo>/<vm>/job.json`, sealed, written atomically (temp, fsync, rename, fsync of its directory and of those above) before `POST` answers; removed durably by `DELETE` (before the job stops) and by the job's end; kept by a daemon stop | the job is started again at `serve` start (its caller's recorded credentials checked again); a `backup_at` passed meanwhile is taken at once; a damaged record is logged and left, no job | `precopy::tests::a_daemon_job_stopped_with_the_daemon_is_started_again_from_its_record_with_its_callers_credentials_and_takes_the_backup_missed_meanwhile`, `precopy::tests::delete_and_a_job_that_ended_or_failed_leave_no_record_to_start_again`, `precopy::jobs::tests::a_damaged_record_is_logged_and_left_and_does_not_keep_the_others_from_starting` |
//! | session upload entry (`diskN.uploaded-G`) | written after its chunk is durable and after a flush of the disk made the bytes it describes durable (an unsynced entry may reach the disk at any time), under the block's stripe lock after set-then-recheck of the block's write stamp; synced at checkpoints (2 s) and when the uploader stops; zeroed and synced by a guest write before its data lands (also after a cutover), its valid bit cleared only after that sync, so a second write to the block meanwhile zeroes and syncs too; the record's first failed sync sticks (every later sync, write and clear fails, so the guest write fails and the disk with it); a generation's record is created empty before the freeze and replaces the old one at the backup's commit | an unsynced entry is lost: the block is uploaded again; a record whose header or any entry does not check is dropped with one log line and every dirty block is read; never a stale chunk in a backup | `crash_consistency::power_cuts_and_daemon_crashes_while_the_uploader_races_guest_writes_and_live_backups_leave_no_stale_entry` (every valid entry of the reopened record is the block's content), `volume::upload_tests::a_guest_write_racing_the_uploader_on_the_same_block_is_never_lost`, `volume::upload_tests::a_second_write_to_a_block_whose_entry_another_write_is_zeroing_lands_only_after_a_synced_zeroing`, `volume::upload_tests::after_a_failed_sync_of_the_upload_record_a_guest_write_over_an_uploaded_block_fails_the_disk`, `session::tests::upload::guest_writes_racing_the_uploader_never_put_a_stale_chunk_in_a_live_backup`, `staging::uploaded::tests::entries_survive_reopen_cleared_ones_do_not_and_a_garbled_one_is_damage`, `session_upload::a_daemon_killed_mid_upload_resumes_without_uploading_recorded_blocks_again_and_a_damaged_record_falls_back` |
//! | uploaded chunks, against `gc` | the uploader holds a writer lock from before its first chunk until no entry of the session is valid (a backup took them); `backup --session` checks each chunk it takes under its own writer lock | a chunk collected while no uploader ran: the backup reads that block (`uploaded_missing`) | `session_upload::after_the_uploader_a_live_backup_reads_only_the_residue_and_restores_exactly_and_gc_keeps_uploaded_chunks` (gc while the upload is recorded), `session_upload::a_daemon_killed_mid_upload_resumes_without_uploading_recorded_blocks_again_and_a_damaged_record_falls_back` (gc in the middle of an upload), `session::tests::upload::uploaded_chunks_collected_while_no_uploader_ran_are_read_by_the_backup_and_it_is_exact` |
//! | profile recording | at `release`, daemon shutdown or the end of the recording window (one atomic object write) | the session's recording is lost; older ones stay | `prefetch::verify_boot_records_a_profile_that_stages_the_next_boot_before_it_reads` |

pub mod agent;
pub mod api;
pub mod boot;
pub mod cli;
pub mod daemon;
pub mod disk;
pub mod error;
pub mod export;
pub mod files;
pub mod metrics;
pub mod placement;
pub mod pool;
pub mod precopy;
pub mod prefetch;
pub mod qemu;
pub mod relocate;
pub mod repo;
pub mod session;
pub mod staging;
pub mod util;
pub mod verify_boot;
pub mod vmbackup;
pub mod volume;

#[cfg(test)]
mod crash_consistency;
#[cfg(test)]
mod testutil;

pub use error::{Error, ErrorKind, Result};

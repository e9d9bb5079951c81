//! Human and JSON output of the CLI commands, a module per family of
//! commands: `repository` (`verify`), `sessions` (`recover`,
//! `release`, `status`), `placement` (where a recovery was placed,
//! `export-points`), `backup` (`backup --session`, `backup-vms`) and
//! `relocation` (`relocate`: its status line, `--cancel`, `--wait`).

mod backup;
mod placement;
mod relocation;
mod repository;
mod sessions;

pub(crate) use backup::{backup_vms, session_backup};
pub(crate) use placement::{export_points, placement};
// For relocate's tests, which read a status as `relocate --wait` does.
#[cfg(test)]
pub(crate) use relocation::wait_verdict;
pub(crate) use relocation::{cancelled_line, relocation_line, wait_relocation};
pub(crate) use repository::verify;
pub(crate) use sessions::{recovered, released, status};

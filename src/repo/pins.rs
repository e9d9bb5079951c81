//! Pins: which backups recovery sessions use, recorded in the repository
//! so that `forget`, run from any host, leaves them alone.
//!
//! `pins/<vm>/<id>.json` per session, `<id>` a hash of the id of the
//! staging directory the session is in (`staging.json`, made once per
//! directory) and the session's directory name there. Not of the host
//! name: a renamed host rewrites its pins under the same keys, and two
//! hosts of one name with the same staging paths (clones, containers,
//! "localhost") have different ids, so neither overwrites nor removes the
//! other's pin. A pin written before ids (no `staging_id`) has the key
//! of the host name and the session directory; it is still read, is still
//! this host's by host and path, and is removed once its session's pin is
//! written with an id (`put`). Where a staging directory's id cannot be
//! asked (a new or empty staging checked for sessions kept there, a pin
//! without an id), "this host's" also needs the pin's machine id
//! (`/etc/machine-id`, where both sides have one) to be this machine's:
//! a host of the same name is not this one. A daemon puts it when a
//! session starts or resumes (state `serving`), rewrites it at `release`
//! (state `kept`: the staging stays and resumes later) and after a live
//! backup (its new base), and deletes it when the staging is discarded.
//! It lists the session's own backup (its disks read that backup's
//! chunks) and the base of its live backups (the next one reuses that
//! base's chunks).
//!
//! A new session puts its pin before it stages anything, then checks
//! that its backup still exists; `forget` deletes, then reads the pins
//! again and puts back what was pinned meanwhile (see `repo::forget`).
//!
//! Pins also say which daemon serves or keeps a VM: a new recovery of a
//! VM another daemon's pin names is refused unless asked for a second
//! copy (`Datastore::refuse_recovered_elsewhere`).
//!
//! Writing a pin never stops a recovery: a repository that cannot be
//! written is logged, and a served session's daemon writes the pin again
//! at its next check of the session's backups (`session::pinning`).

use serde::{Deserialize, Serialize};

use super::Repository;
use crate::error::{Error, Result};
use crate::util::validate_name;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pin {
    pub vm: String,
    /// The backups it uses: its own, then its live-backup base if another.
    pub backups: Vec<String>,
    pub host: String,
    /// The session's staging directory on that host.
    pub staging: String,
    /// The id of the staging directory holding `staging`: the daemon that
    /// pinned is the one serving that directory, whatever its host is
    /// called. None in a pin written before ids (then host and path say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_id: Option<String>,
    /// The machine that wrote it (`/etc/machine-id`), where known: a host
    /// of the same name (a clone, a container) is another machine, so its
    /// pins at the same paths are never taken for this host's (see
    /// [`of_host_under`]). None in older pins and where there is no
    /// machine id: then the host name alone says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Its session may have a pin written before ids, which `put` then
    /// removes (its staging directory was set up before ids); otherwise
    /// `put` makes no second request.
    #[serde(skip)]
    pub replaces_legacy: bool,
    /// The key it was read from, for a pin read from the repository:
    /// `remove` deletes that object (a pin whose name does not match its
    /// content, copied or made by hand, would otherwise stay while
    /// `remove` deleted the key its content gives).
    #[serde(skip)]
    pub read_from: Option<String>,
    /// `serving` or `kept`.
    pub state: String,
    /// When it was last written (RFC 3339).
    pub written: String,
    /// The process of a throwaway recovery (`files`, `verify-boot`): its
    /// session lives only as long as that process, so once it is known
    /// dead (killed before its cleanup) the pin protects nothing and
    /// `forget` drops it. Daemons' pins have none: their sessions resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<super::locks::Owner>,
}

/// The same pin: what is stored (not where it was read from, nor what
/// `put` does besides).
impl PartialEq for Pin {
    fn eq(&self, o: &Pin) -> bool {
        serde_json::to_value(self).ok() == serde_json::to_value(o).ok()
    }
}

impl Eq for Pin {}

impl Pin {
    pub fn new(vm: &str, backups: Vec<String>, staging: &std::path::Path, serving: bool) -> Pin {
        Pin {
            vm: vm.into(),
            backups,
            host: hostname(),
            staging: staging.display().to_string(),
            staging_id: None,
            machine: machine_id(),
            replaces_legacy: false,
            read_from: None,
            state: if serving { "serving" } else { "kept" }.into(),
            written: crate::util::rfc3339(crate::util::now_unix()),
            owner: None,
        }
    }

    /// Why its throwaway session is known to be gone (see `owner`).
    pub fn dead_owner(&self) -> Option<String> {
        self.owner.as_ref().and_then(super::locks::dead_process)
    }

    /// `self` naming staging directory `id`.
    pub fn in_staging(mut self, id: &str) -> Pin {
        self.staging_id = Some(id.into());
        self
    }

    /// Where it is stored: of its staging directory's id and its session
    /// directory's name (the backup id, one per VM in a staging directory),
    /// so that neither a new host name nor a moved mount point changes it.
    fn key(&self) -> String {
        let Some(id) = &self.staging_id else {
            return self.legacy_key();
        };
        let dir = std::path::Path::new(&self.staging);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_else(|| self.staging.as_str().into());
        let hash = blake3::hash(format!("staging-id\0{id}\0{name}").as_bytes()).to_hex();
        format!("pins/{}/{}.json", self.vm, &hash[..16])
    }

    /// The key a pin without a staging id has (and had before ids), of its
    /// host and session directory.
    fn legacy_key(&self) -> String {
        let id = blake3::hash(format!("{}\0{}", self.host, self.staging).as_bytes()).to_hex();
        format!("pins/{}/{}.json", self.vm, &id[..16])
    }

    /// Why a backup it lists may not be forgotten, for people.
    pub fn reason(&self) -> String {
        let what = if self.state == "serving" {
            "a live recovery session"
        } else {
            "the kept staging of a recovery session"
        };
        format!("used by {what} on host {} ({})", self.host, self.staging)
    }

    /// Whether a daemon serving the staging directories `ids` on host
    /// `host` wrote it: its staging id is one of them, or (a pin written
    /// before ids) it names `host` and `holds` its directory.
    pub fn is_of(&self, ids: &[&str], host: &str, holds: impl FnOnce(&str) -> bool) -> bool {
        match &self.staging_id {
            Some(id) => ids.contains(&id.as_str()),
            None => self.host == host && holds(&self.staging),
        }
    }
}

/// This machine's id (`/etc/machine-id`), read once; `None` where there
/// is none (some containers) or it is not a plain id.
pub fn machine_id() -> Option<String> {
    static ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let id = std::fs::read_to_string("/etc/machine-id").ok()?;
        let id = id.trim();
        (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_string())
    })
    .clone()
}

impl Pin {
    /// Written on another machine than this one, as far as both machine
    /// ids say (unknown on either side: not known to be another).
    pub fn on_other_machine(&self) -> bool {
        matches!((&self.machine, machine_id()), (Some(theirs), Some(ours)) if *theirs != ours)
    }
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "?".into())
}

/// Writes (or rewrites) a session's pin. One with a staging id whose
/// directory predates ids (`replaces_legacy`) then removes the pin this
/// host wrote for that session directory before ids (by the old rule,
/// host and path, that one is this session's): left, it would keep its
/// backups from `forget` for ever. Not removed (a repository that takes
/// the put and not the delete) is logged: it only protects, and the
/// next put of this daemon tries again. Other puts make one request.
pub fn put(repo: &Repository, pin: &Pin) -> Result<()> {
    validate_name("VM name", &pin.vm)?;
    let body = serde_json::to_vec_pretty(pin).expect("serializable");
    repo.backend().put(&pin.key(), &body)?;
    if pin.staging_id.is_some() && pin.replaces_legacy {
        if let Err(e) = repo.backend().delete(&pin.legacy_key()) {
            tracing::warn!(vm = %pin.vm, "could not remove the session's pin written before staging ids (it keeps its backups from forget until removed): {e}");
        }
    }
    Ok(())
}

/// Removes a session's pin (its staging is gone), and for one with a
/// staging id the pin of its session written before ids (see `put`).
pub fn remove(repo: &Repository, pin: &Pin) -> Result<()> {
    // One read from the repository: the object it was read from, whatever
    // its content says its key is (another object may have that key).
    let key = pin.read_from.clone().unwrap_or_else(|| pin.key());
    repo.backend().delete(&key)?;
    if pin.staging_id.is_some() {
        repo.backend().delete(&pin.legacy_key())?;
    }
    Ok(())
}

/// `put`/`remove`, logged instead of failing (see the module docs);
/// whether the pin was written.
pub fn put_logged(repo: &Repository, pin: &Pin) -> bool {
    let r = put(repo, pin);
    if let Err(e) = &r {
        tracing::warn!(vm = %pin.vm, "could not pin the session's backups in the repository (forget may remove them until it is written again): {e}");
    }
    r.is_ok()
}

pub fn remove_logged(repo: &Repository, pin: &Pin) {
    if let Err(e) = remove(repo, pin) {
        tracing::warn!(vm = %pin.vm, "could not remove the session's pin from the repository (its backups stay protected from forget): {e}");
    }
}

/// Every pin of `vm`. A pin that cannot be read is an error: what it
/// protects is unknown.
pub fn of_vm(repo: &Repository, vm: &str) -> Result<Vec<Pin>> {
    read_of_vm(repo, vm, &|key, e| {
        Err(Error::corrupt(format!(
            "pin {key} is damaged ({e}): the backups it protects are unknown; remove it by hand if its session is gone"
        )))
    })
}

/// Every pin of `vm` that can be read; a damaged one is logged and passed
/// over (for checks that must not stop on it, unlike `forget`).
pub fn of_vm_readable(repo: &Repository, vm: &str) -> Result<Vec<Pin>> {
    read_of_vm(repo, vm, &|key, e| {
        tracing::warn!("pin {key} is damaged ({e}): passed over");
        Ok(())
    })
}

/// The pins of `vm`; `damaged` decides about one that does not parse.
fn read_of_vm(
    repo: &Repository,
    vm: &str,
    damaged: &dyn Fn(&str, serde_json::Error) -> Result<()>,
) -> Result<Vec<Pin>> {
    validate_name("VM name", vm)?;
    let mut out = vec![];
    for o in repo.backend().list_all(&format!("pins/{vm}"))? {
        let Some(bytes) = repo.backend().get(&o.key, super::limits::MAX_META_BYTES)? else {
            continue;
        };
        match serde_json::from_slice::<Pin>(&bytes) {
            Ok(mut pin) => {
                pin.read_from = Some(o.key);
                out.push(pin)
            }
            Err(e) => damaged(&o.key, e)?,
        }
    }
    Ok(out)
}

/// The pins of this host whose session directory lies under `root`: the
/// sessions the staging directory `root` held (a staging directory found
/// empty with such pins is a disk not mounted, not a new one). A pin of
/// another machine of the same host name is not this host's (its
/// `--staging-lost` must not remove it). A damaged pin is skipped with a
/// warning: its host and directory are unknown.
pub fn of_host_under(repo: &Repository, root: &std::path::Path) -> Result<Vec<Pin>> {
    let host = hostname();
    let mut out = vec![];
    for o in repo.backend().list_all("pins")? {
        let Some(bytes) = repo.backend().get(&o.key, super::limits::MAX_META_BYTES)? else {
            continue;
        };
        match serde_json::from_slice::<Pin>(&bytes) {
            Ok(mut pin)
                if pin.host == host
                    && !pin.on_other_machine()
                    && std::path::Path::new(&pin.staging).starts_with(root) =>
            {
                pin.read_from = Some(o.key);
                out.push(pin)
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("pin {} is damaged ({e}): skipped", o.key),
        }
    }
    Ok(out)
}

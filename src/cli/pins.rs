//! `recoverfs pins ls|drop`: the repository's record of which daemon
//! serves or keeps which VM (`repo::pins`). A pin protects its backups
//! from `forget` and refuses a second recovery of its VM elsewhere; the
//! pin of a host lost for good would do both for ever, and nothing but
//! this command removes it (`staging drop --repo` removes this host's).

use clap::Subcommand;

use crate::error::{Error, Result};
use crate::repo::pins::{self, Pin};
use crate::repo::Repository;

#[derive(Subcommand)]
pub enum PinsCmd {
    /// List the pins: VM, host, state, when written, staging directory
    /// (and its id) and the backups each protects.
    Ls {
        #[arg(long)]
        repo: String,
        /// Only this VM's.
        vm: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove the pins of VM that name host HOST (and, with --staging,
    /// that directory): for a host lost for good. A session of this host
    /// whose staging directory is there is refused (`release --discard`
    /// or `staging drop --repo` end it with its staging), and so is a
    /// throwaway recovery whose process still runs.
    Drop {
        #[arg(long)]
        repo: String,
        vm: String,
        #[arg(long)]
        host: String,
        /// Only pins of sessions in this staging directory (as `pins ls`
        /// shows it, or one of its session directories); on a lost host
        /// the path is that host's, taken as written.
        #[arg(long)]
        staging: Option<String>,
    },
}

pub fn run(cmd: PinsCmd) -> Result<()> {
    match cmd {
        PinsCmd::Ls { repo, vm, json } => ls(&*Repository::open(&repo)?, vm.as_deref(), json),
        PinsCmd::Drop {
            repo,
            vm,
            host,
            staging,
        } => drop_pins(&*Repository::open(&repo)?, &vm, &host, staging.as_deref()),
    }
}

fn ls(repo: &Repository, vm: Option<&str>, json: bool) -> Result<()> {
    let vms = match vm {
        Some(v) => vec![v.to_string()],
        None => repo.backend().list("pins")?,
    };
    let mut all = vec![];
    for v in &vms {
        all.extend(pins::of_vm_readable(repo, v)?);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "pins": all })).expect("json")
        );
        return Ok(());
    }
    if all.is_empty() {
        println!("no pins in {}", repo.location());
        return Ok(());
    }
    for p in &all {
        println!("{}", line(p));
    }
    Ok(())
}

/// One pin, for people (control characters of a forged one shown as `?`).
fn line(p: &Pin) -> String {
    let who = match &p.owner {
        // Its state is what it wrote last: a killed process wrote no end.
        Some(o) => match p.dead_owner() {
            Some(why) => format!(
                " (throwaway, pid {}: its process is gone ({why}); the next forget drops it)",
                o.pid
            ),
            None => format!(" (throwaway, pid {})", o.pid),
        },
        None => String::new(),
    };
    let id = match &p.staging_id {
        Some(id) => format!(" (staging id {id})"),
        None => String::new(),
    };
    // Only worth saying of a pin that names this host's name.
    let machine = match (
        &p.machine,
        p.on_other_machine() && p.host == pins::hostname(),
    ) {
        (Some(m), true) => format!(" (another machine of this host's name: machine id {m})"),
        _ => String::new(),
    };
    let text = format!(
        "{} {} on host {}{machine}{who}, written {}, in {}{id}: backups {}",
        p.vm,
        p.state,
        p.host,
        p.written,
        p.staging,
        p.backups.join(", ")
    );
    crate::util::escape_controls(&text).into_owned()
}

fn drop_pins(repo: &Repository, vm: &str, host: &str, staging: Option<&str>) -> Result<()> {
    let matching: Vec<Pin> = pins::of_vm_readable(repo, vm)?
        .into_iter()
        .filter(|p| p.host == host && staging.is_none_or(|s| in_staging(&p.staging, s)))
        .collect();
    if matching.is_empty() {
        return Err(Error::not_found(format!(
            "no pin of VM {vm} names host {host}{}: see `recoverfs pins ls --repo {} {vm}`",
            staging.map(|s| format!(" and {s}")).unwrap_or_default(),
            repo.location()
        )));
    }
    for p in &matching {
        refuse_live(p)?;
    }
    for p in &matching {
        pins::remove(repo, p)?;
        println!("removed: {}", line(p));
    }
    eprintln!(
        "forget no longer keeps those backups for these sessions, and VM {vm} may be recovered elsewhere without --second-copy"
    );
    Ok(())
}

/// Whether session directory `session` is `staging` or lies in it (a
/// staging directory, or a session directory; a trailing `/` ignored).
fn in_staging(session: &str, staging: &str) -> bool {
    let staging = staging.trim_end_matches('/');
    !staging.is_empty() && std::path::Path::new(session).starts_with(staging)
}

/// A pin whose session is known to live here is not this command's.
fn refuse_live(p: &Pin) -> Result<()> {
    let this_host = p.host == pins::hostname() && !p.on_other_machine();
    if p.owner.is_some() && p.dead_owner().is_none() && this_host {
        return Err(Error::busy(format!(
            "the pin of VM {} in {} is a throwaway recovery's whose process still runs: it goes when that ends",
            p.vm, p.staging
        )));
    }
    if p.owner.is_none() && session_here(p) {
        return Err(Error::busy(format!(
            "VM {} has a session on this host in {}: end it with `recoverfs release --discard {}` (served) or `recoverfs staging drop --repo` (kept), which remove its pin with its staging",
            p.vm, p.staging, p.vm
        )));
    }
    Ok(())
}

/// Whether the session `p` pins has its staging here: the directory at
/// its path is there, and (a pin with a staging id) in the staging
/// directory of that id, whatever host name the pin gives (this host
/// renamed) and not another's of the same name and paths. One that
/// cannot be looked at counts as here.
fn session_here(p: &Pin) -> bool {
    let dir = std::path::Path::new(&p.staging);
    if !dir.try_exists().unwrap_or(true) {
        return false;
    }
    match &p.staging_id {
        None => p.host == pins::hostname() && !p.on_other_machine(),
        Some(id) => match crate::staging::root_of_session(dir).map(crate::staging::id_at) {
            Some(Ok(here)) => here.as_ref() == Some(id),
            Some(Err(_)) => true,
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_refuses_a_session_in_a_staging_here_by_its_id_and_not_another_hosts_of_this_name() {
        let d = tempfile::tempdir().unwrap();
        let staging = crate::staging::StagingDir::open(&d.path().join("s"), "r1", "/r").unwrap();
        let dir = staging.session_dir("vm", "b1");
        std::fs::create_dir_all(&dir).unwrap();
        // This host's, pinned before it was renamed: refused.
        let mut ours = Pin::new("vm", vec!["b1".into()], &dir, true).in_staging(staging.id());
        ours.host = "old-name".into();
        let e = refuse_live(&ours).unwrap_err().to_string();
        assert!(e.contains("has a session on this host"), "{e}");
        // Another host of this name whose staging has the same path.
        let theirs = Pin::new("vm", vec!["b1".into()], &dir, true).in_staging("another");
        refuse_live(&theirs).unwrap();
    }

    /// explore8 LOW: a killed `files` run's pin read as `serving`.
    #[test]
    fn a_throwaway_pin_whose_process_is_gone_says_so() {
        let dir = std::path::Path::new("/s/sessions/vm/b1");
        let mut p = Pin::new("vm", vec!["b1".into()], dir, true);
        p.owner = Some(crate::repo::locks::this_process());
        let live = line(&p);
        assert!(!live.contains("gone"), "{live}");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        p.owner.as_mut().unwrap().pid = pid;
        let dead = line(&p);
        assert!(
            dead.contains(&format!("(throwaway, pid {pid}: its process is gone (pid {pid} on this host has exited); the next forget drops it)")),
            "{dead}"
        );
    }

    #[test]
    fn drop_takes_a_staging_directory_or_a_session_directory_for_staging() {
        let session = "/st1/sessions/vma/20261124-040018";
        for s in ["/st1", "/st1/", session] {
            assert!(in_staging(session, s), "{s}");
        }
        for s in ["/st", "/st1/sessions/vmb", "", "/"] {
            assert!(!in_staging(session, s), "{s}");
        }
    }

    #[test]
    fn drop_removes_the_pin_it_listed_even_stored_under_another_name_than_its_content_gives() {
        let d = tempfile::tempdir().unwrap();
        let (repo, _) =
            Repository::open_or_create(d.path().join("repo").to_str().unwrap()).unwrap();
        let mut ghost = Pin::new(
            "vm",
            vec!["b1".into()],
            std::path::Path::new("/gone/s/sessions/vm/b1"),
            true,
        );
        ghost.host = "ghost".into();
        // Copied by hand under a name of its own.
        let body = serde_json::to_vec(&ghost).unwrap();
        repo.backend()
            .put("pins/vm/0123456789abcdef.json", &body)
            .unwrap();
        drop_pins(&repo, "vm", "ghost", None).unwrap();
        assert!(
            pins::of_vm(&repo, "vm").unwrap().is_empty(),
            "`removed` was said of a pin still there"
        );
    }
}

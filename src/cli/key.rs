//! Keys of encrypted repositories: the global `--key-file` and passphrase
//! options, `init --encrypt`, `key export` and `key change-passphrase`.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::error::{Error, Result};
use crate::repo::crypto::{self, KeySource, Keys};
use crate::repo::Repository;

#[derive(clap::Args, Clone, Default)]
pub struct KeyArgs {
    /// Key file of an encrypted repository (every command and `serve`).
    #[arg(long, global = true, env = "RECOVERFS_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// File whose first line is the key file's passphrase (or set
    /// RECOVERFS_PASSPHRASE).
    #[arg(
        long,
        global = true,
        env = "RECOVERFS_PASSPHRASE_FILE",
        value_name = "FILE"
    )]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Write a copy of the key file (same passphrase) for safekeeping,
    /// after checking it opens the repository.
    Export {
        #[arg(long)]
        repo: String,
        /// Where to write it (must not exist).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Re-protect --key-file with a new passphrase (first line of
    /// --new-passphrase-file, or RECOVERFS_NEW_PASSPHRASE), or none.
    ChangePassphrase {
        #[arg(long, env = "RECOVERFS_NEW_PASSPHRASE_FILE", value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// Store the key without a passphrase.
        #[arg(long, conflicts_with = "new_passphrase_file")]
        no_passphrase: bool,
    },
}

/// A passphrase from a file's first line, else from `env`.
fn passphrase(file: Option<&Path>, env: &str) -> Result<Option<String>> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::io(format!("read passphrase file {}", f.display()), e))?;
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            return Err(Error::invalid(format!(
                "passphrase file {} is empty",
                f.display()
            )));
        }
        return Ok(Some(line));
    }
    Ok(std::env::var(env).ok().filter(|p| !p.is_empty()))
}

/// Sets the process's key source from the global options.
pub fn install(k: &KeyArgs) -> Result<()> {
    crypto::set_process_key_source(KeySource {
        key_file: k.key_file.clone(),
        passphrase: passphrase(k.passphrase_file.as_deref(), "RECOVERFS_PASSPHRASE")?,
    });
    Ok(())
}

/// `init --encrypt`: a new key file, then the repository with its
/// fingerprint. The key file is removed again if no new repository came
/// of it.
pub fn init_encrypted(repo: &str, k: &KeyArgs) -> Result<()> {
    let path = k.key_file.as_deref().ok_or_else(|| {
        Error::invalid(
            "init --encrypt needs --key-file FILE (a new file: the key is written there)",
        )
    })?;
    let keys = Keys::generate();
    let pass = passphrase(k.passphrase_file.as_deref(), "RECOVERFS_PASSPHRASE")?;
    crypto::write_key_file(path, &keys, pass.as_deref())?;
    let undo = |e: Error| {
        let _ = std::fs::remove_file(path);
        e
    };
    let (r, created) = Repository::open_or_create_keyed(repo, Some(keys.clone())).map_err(undo)?;
    if !created {
        return Err(undo(Error::new(
            crate::error::ErrorKind::AlreadyExists,
            format!("repository {} already exists", r.location()),
        )));
    }
    println!(
        "created encrypted repository {} (id {}), key fingerprint {}",
        r.location(),
        r.id(),
        keys.fingerprint()
    );
    eprintln!(
        "keep a copy of {} somewhere else: without it the repository cannot be read",
        path.display()
    );
    Ok(())
}

pub fn run(cmd: KeyCmd, k: &KeyArgs) -> Result<()> {
    let path = k
        .key_file
        .as_deref()
        .ok_or_else(|| Error::invalid("give the key file with --key-file or RECOVERFS_KEY_FILE"))?;
    let old = passphrase(k.passphrase_file.as_deref(), "RECOVERFS_PASSPHRASE")?;
    match cmd {
        KeyCmd::Export { repo, output } => {
            let r = Repository::open(&repo)?;
            if r.encryption().is_none() {
                return Err(Error::invalid(format!(
                    "repository {} is not encrypted",
                    r.location()
                )));
            }
            let keys = crypto::load_key_file(path, old.as_deref())?;
            crypto::write_key_file(&output, &keys, old.as_deref())?;
            println!("wrote key {} to {}", keys.fingerprint(), output.display());
        }
        KeyCmd::ChangePassphrase {
            new_passphrase_file,
            no_passphrase,
        } => {
            let new = passphrase(new_passphrase_file.as_deref(), "RECOVERFS_NEW_PASSPHRASE")?;
            if new.is_none() && !no_passphrase {
                return Err(Error::invalid(
                    "give the new passphrase with --new-passphrase-file or RECOVERFS_NEW_PASSPHRASE, or --no-passphrase",
                ));
            }
            let keys = crypto::change_passphrase(path, old.as_deref(), new.as_deref())?;
            println!(
                "key {} in {} is now {}",
                keys.fingerprint(),
                path.display(),
                if new.is_some() {
                    "protected by the new passphrase"
                } else {
                    "stored without a passphrase"
                }
            );
        }
    }
    Ok(())
}

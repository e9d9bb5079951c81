//! `recoverfs upload VM`: starts, shows or stops a recovery session's
//! uploader in the daemon (`session::upload`, `/sessions/{vm}/upload`).

use serde_json::{json, Value};

use super::SocketArg;
use crate::error::Result;
use crate::util::human_bytes;

#[derive(clap::Args)]
pub struct UploadArgs {
    #[command(flatten)]
    socket: SocketArg,
    vm: String,
    /// Slow down when the guest's I/O (moving averages of its request
    /// latency and queue depth on this session's disks; with p99=MS the
    /// share of requests slower than MS, which also paces blocks) reaches
    /// a limit; halt at 1.25 times a limit; resume below it.
    #[arg(long, value_name = "latency=MS,p99=MS,queue=N", conflicts_with_all = ["status", "stop"])]
    load_limit: Option<String>,
    /// Only show the uploader's state.
    #[arg(long, conflicts_with = "stop")]
    status: bool,
    /// Stop the uploader (what it stored stays usable by the next backup).
    #[arg(long)]
    stop: bool,
    /// Print the daemon's JSON reply.
    #[arg(long)]
    json: bool,
}

pub fn run(a: UploadArgs) -> Result<()> {
    crate::util::validate_name("VM name", &a.vm)?;
    if let Some(l) = &a.load_limit {
        crate::precopy::LoadLimit::parse(l)?;
    }
    let c = super::client(&a.socket);
    let path = format!("/sessions/{}/upload", a.vm);
    let r = if a.status {
        c.get(&path)?
    } else if a.stop {
        c.delete(&path)?
    } else {
        c.post(&path, &json!({ "load_limit": a.load_limit }))?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    } else {
        print(&r);
    }
    Ok(())
}

fn print(r: &Value) {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let why = r["why"].as_str().filter(|w| !w.is_empty());
    println!(
        "VM {}: uploader {}{}; generation {}: {} blocks uploaded, residue {} blocks; this run stored {} blocks ({} read, {} new)",
        r["vm"].as_str().unwrap_or("?"),
        r["state"].as_str().unwrap_or("?"),
        why.map(|w| format!(" ({w})")).unwrap_or_default(),
        n("generation"),
        n("blocks_uploaded"),
        n("residue"),
        n("stored_blocks"),
        human_bytes(n("bytes_read")),
        human_bytes(n("new_bytes")),
    );
    if let Some(e) = r["error"].as_str() {
        println!("error: {e}");
    }
}

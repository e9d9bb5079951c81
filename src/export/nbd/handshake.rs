//! The fixed newstyle handshake: greeting, client flags, then options until
//! the client enters transmission (NBD_OPT_GO, NBD_OPT_EXPORT_NAME) or
//! leaves.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;
use super::{Exports, OpenGuard};
use crate::disk::Disk;
use crate::error::{Error, ErrorKind, Result};

/// What the handshake agreed on: the transmission phase's input.
pub struct Negotiated {
    /// The export's canonical name (the empty name resolved).
    pub name: String,
    pub disk: Arc<dyn Disk>,
    /// Held until the connection ends.
    pub guard: Box<dyn OpenGuard>,
    pub size: u64,
    pub structured: bool,
    pub contexts: Contexts,
}

/// Negotiation state carried from option to option.
#[derive(Default)]
struct State {
    no_zeroes: bool,
    structured: bool,
    /// Contexts of the last NBD_OPT_SET_META_CONTEXT and the export they
    /// were set for; they apply only if the client goes to that export.
    meta: Option<(String, Contexts)>,
    /// The client, as its connection names it (see `Exports::open_by`).
    peer: String,
}

/// What one option led to.
enum Next {
    Continue,
    Transmit(Box<Negotiated>),
}

/// Runs the handshake up to the transmission phase; `Err` says why the
/// connection ends instead (`End::Abort` for a clean abort).
pub async fn negotiate<S>(
    s: &mut S,
    exports: &Arc<dyn Exports>,
    peer: &str,
) -> Result<Negotiated, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut st = State {
        no_zeroes: greet(s).await?,
        peer: peer.to_string(),
        ..State::default()
    };
    loop {
        let (option, data) = read_option(s).await?;
        if let Next::Transmit(n) = handle_option(s, exports, &mut st, option, &data).await? {
            return Ok(*n);
        }
    }
}

/// Sends the greeting and reads the client flags; true if the client
/// asked for no zero padding.
async fn greet<S>(s: &mut S) -> Result<bool, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    let flags = s.read_u32().await?;
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {flags:#x}")));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(violation(
            "the client does not speak fixed newstyle negotiation (only fixed newstyle is served)"
                .into(),
        ));
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// Logs a protocol violation once, where it is found.
fn violation(what: String) -> End {
    tracing::warn!("NBD client violated the protocol, closing: {what}");
    End::Violation(what)
}

/// Reads one option header and its (bounded) data.
async fn read_option<S>(s: &mut S) -> Result<(u32, Vec<u8>), End>
where
    S: AsyncRead + Unpin,
{
    let magic = s.read_u64().await?;
    if magic != IHAVEOPT {
        return Err(violation(format!("bad option magic {magic:#018x}")));
    }
    let option = s.read_u32().await?;
    let len = s.read_u32().await?;
    if len > MAX_OPTION_LEN {
        return Err(violation(format!(
            "option {option} carries {len} bytes (limit {MAX_OPTION_LEN})"
        )));
    }
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).await?;
    Ok((option, data))
}

async fn handle_option<S>(
    s: &mut S,
    exports: &Arc<dyn Exports>,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> Result<Next, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match option {
        OPT_EXPORT_NAME => export_name(s, exports, st, data).await,
        OPT_ABORT => {
            // The client may already be gone: the ACK is a courtesy.
            let _ = s.write_all(&option_reply(option, REP_ACK, &[])).await;
            Err(End::Abort)
        }
        OPT_LIST => list(s, exports, data).await.map(|_| Next::Continue),
        OPT_STARTTLS => {
            let msg = "TLS is not supported by this server";
            reply(s, option, REP_ERR_POLICY, msg.as_bytes()).await?;
            Ok(Next::Continue)
        }
        OPT_INFO | OPT_GO => info_or_go(s, exports, st, option, data).await,
        OPT_STRUCTURED_REPLY => {
            if data.is_empty() {
                st.structured = true;
                reply(s, option, REP_ACK, &[]).await?;
            } else {
                let msg = "NBD_OPT_STRUCTURED_REPLY takes no data";
                reply(s, option, REP_ERR_INVALID, msg.as_bytes()).await?;
            }
            Ok(Next::Continue)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(s, exports, st, option, data).await?;
            Ok(Next::Continue)
        }
        _ => {
            let msg = format!("option {option} is not supported by this server");
            reply(s, option, REP_ERR_UNSUP, msg.as_bytes()).await?;
            Ok(Next::Continue)
        }
    }
}

async fn reply<S>(s: &mut S, option: u32, typ: u32, data: &[u8]) -> Result<(), End>
where
    S: AsyncWrite + Unpin,
{
    s.write_all(&option_reply(option, typ, data)).await?;
    Ok(())
}

/// The exports, asked off the runtime's workers (the daemon's table may
/// be locked by a slow recover).
async fn list_exports(exports: &Arc<dyn Exports>) -> Vec<(String, String)> {
    let e = exports.clone();
    tokio::task::spawn_blocking(move || e.list())
        .await
        .unwrap_or_default()
}

/// The export `name` denotes, with its description: the empty name is the
/// only export if there is exactly one.
fn resolve(list: Vec<(String, String)>, name: &str) -> Option<(String, String)> {
    if name.is_empty() {
        return if list.len() == 1 {
            list.into_iter().next()
        } else {
            None
        };
    }
    list.into_iter().find(|(n, _)| n == name)
}

/// Why `name` resolved to nothing, for the client's error message.
fn unknown_message(exports: &Arc<dyn Exports>, name: &str, count: usize) -> String {
    if name.is_empty() {
        format!("no default export: this server has {count} exports, name one (nbdinfo --list shows them)")
    } else if let Some(there) = exports.elsewhere(name) {
        format!("no export named {name:?} on this server: {there}")
    } else {
        format!("no export named {name:?} on this server (nbdinfo --list shows the exports)")
    }
}

/// Opens the export for transmission, off the runtime's workers.
async fn open_export(
    exports: &Arc<dyn Exports>,
    name: &str,
    peer: &str,
) -> Result<(Arc<dyn Disk>, Box<dyn OpenGuard>, u64)> {
    let (e, name, peer) = (exports.clone(), name.to_string(), peer.to_string());
    off_workers(move || {
        let (disk, guard) = e.open_by(&name, &peer)?;
        let size = disk.size();
        Ok((disk, guard, size))
    })
    .await
}

/// Looks at the export (NBD_OPT_INFO) off the runtime's workers: no guard,
/// and no attach (`Exports::look`).
async fn look_export(
    exports: &Arc<dyn Exports>,
    name: &str,
    peer: &str,
) -> Result<(Arc<dyn Disk>, u64)> {
    let (e, name, peer) = (exports.clone(), name.to_string(), peer.to_string());
    off_workers(move || {
        let disk = e.look(&name, &peer)?;
        let size = disk.size();
        Ok((disk, size))
    })
    .await
}

async fn off_workers<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Error::new(
            ErrorKind::Io,
            format!("opening the export failed: {e}"),
        ))
    })
}

async fn list<S>(s: &mut S, exports: &Arc<dyn Exports>, data: &[u8]) -> Result<(), End>
where
    S: AsyncWrite + Unpin,
{
    if !data.is_empty() {
        let msg = "NBD_OPT_LIST takes no data";
        return reply(s, OPT_LIST, REP_ERR_INVALID, msg.as_bytes()).await;
    }
    for (name, description) in list_exports(exports).await {
        let mut d = Vec::with_capacity(4 + name.len() + description.len());
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(clip(&description).as_bytes());
        reply(s, OPT_LIST, REP_SERVER, &d).await?;
    }
    reply(s, OPT_LIST, REP_ACK, &[]).await
}

/// NBD_OPT_EXPORT_NAME: no way to report an error but closing.
async fn export_name<S>(
    s: &mut S,
    exports: &Arc<dyn Exports>,
    st: &mut State,
    data: &[u8],
) -> Result<Next, End>
where
    S: AsyncWrite + Unpin,
{
    let requested = String::from_utf8_lossy(data).into_owned();
    let list = list_exports(exports).await;
    let count = list.len();
    let Some((name, _)) = resolve(list, &requested) else {
        let msg = unknown_message(exports, &requested, count);
        tracing::info!("NBD client refused: {msg}");
        return Err(End::Refused(msg));
    };
    let (disk, guard, size) = open_export(exports, &name, &st.peer).await.map_err(|e| {
        tracing::info!("NBD client refused: cannot open export {name:?}: {e}");
        End::Refused(format!("cannot open export {name:?}: {e}"))
    })?;
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags(st.structured).to_be_bytes());
    if !st.no_zeroes {
        b.extend_from_slice(&[0; 124]);
    }
    s.write_all(&b).await?;
    Ok(Next::Transmit(Box::new(negotiated(
        st, name, disk, guard, size,
    ))))
}

fn negotiated(
    st: &State,
    name: String,
    disk: Arc<dyn Disk>,
    guard: Box<dyn OpenGuard>,
    size: u64,
) -> Negotiated {
    let contexts = match &st.meta {
        Some((n, c)) if *n == name => *c,
        _ => Contexts::default(),
    };
    Negotiated {
        name,
        disk,
        guard,
        size,
        structured: st.structured,
        contexts,
    }
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data: the export name (the
/// information requests are ignored: every item is always sent).
fn parse_info(data: &[u8]) -> Option<String> {
    let mut c = Cursor::new(data);
    let name = c.string()?.to_string();
    let n = c.u16()?;
    c.bytes(2 * n as usize)?;
    c.is_empty().then_some(name)
}

async fn info_or_go<S>(
    s: &mut S,
    exports: &Arc<dyn Exports>,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> Result<Next, End>
where
    S: AsyncWrite + Unpin,
{
    let Some(requested) = parse_info(data) else {
        let msg = "malformed NBD_OPT_INFO/NBD_OPT_GO request";
        reply(s, option, REP_ERR_INVALID, msg.as_bytes()).await?;
        return Ok(Next::Continue);
    };
    let list = list_exports(exports).await;
    let count = list.len();
    let Some((name, description)) = resolve(list, &requested) else {
        let msg = unknown_message(exports, &requested, count);
        reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
        return Ok(Next::Continue);
    };
    // INFO only looks: the export is not held open while the client reads
    // the answer, nor is it an attach.
    let opened = match option {
        OPT_GO => open_export(exports, &name, &st.peer)
            .await
            .map(|(disk, guard, size)| (disk, Some(guard), size)),
        _ => (look_export(exports, &name, &st.peer).await).map(|(disk, size)| (disk, None, size)),
    };
    let (disk, guard, size) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let typ = match e.kind() {
                ErrorKind::NotFound => REP_ERR_UNKNOWN,
                _ => REP_ERR_POLICY,
            };
            let msg = format!("cannot open export {name:?}: {e}");
            reply(s, option, typ, clip(&msg).as_bytes()).await?;
            return Ok(Next::Continue);
        }
    };
    let opened = guard.map(|guard| (disk, guard));
    for item in export_info(&name, &description, size, st.structured) {
        reply(s, option, REP_INFO, &item).await?;
    }
    reply(s, option, REP_ACK, &[]).await?;
    match opened {
        Some((disk, guard)) => Ok(Next::Transmit(Box::new(negotiated(
            st, name, disk, guard, size,
        )))),
        None => Ok(Next::Continue),
    }
}

/// Every NBD_REP_INFO item, requested or not (clients ignore what they
/// did not ask for; the block sizes are the defaults anyway).
fn export_info(name: &str, description: &str, size: u64, structured: bool) -> Vec<Vec<u8>> {
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&size.to_be_bytes());
    export.extend_from_slice(&transmission_flags(structured).to_be_bytes());
    let mut name_item = INFO_NAME.to_be_bytes().to_vec();
    name_item.extend_from_slice(clip(name).as_bytes());
    let mut desc = INFO_DESCRIPTION.to_be_bytes().to_vec();
    desc.extend_from_slice(clip(description).as_bytes());
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD] {
        sizes.extend_from_slice(&v.to_be_bytes());
    }
    vec![export, name_item, desc, sizes]
}

/// Parses NBD_OPT_LIST/SET_META_CONTEXT data: export name and queries.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor::new(data);
    let name = c.string()?.to_string();
    let n = c.u32()?;
    let mut queries = vec![];
    for _ in 0..n {
        queries.push(c.string()?.to_string());
    }
    c.is_empty().then_some((name, queries))
}

/// Contexts a LIST query matches: an empty query list or a namespace
/// ("base:", "recoverfs:") lists every context in it.
fn list_matches(queries: &[String]) -> Contexts {
    if queries.is_empty() {
        return Contexts {
            allocation: true,
            changed: true,
        };
    }
    let mut c = Contexts::default();
    for q in queries {
        match q.as_str() {
            "base:" | CONTEXT_ALLOCATION => c.allocation = true,
            "recoverfs:" | CONTEXT_CHANGED => c.changed = true,
            _ => {}
        }
    }
    c
}

/// Contexts a SET query selects: only exact names (the spec has SET ignore
/// namespace wildcards and unknown names).
fn set_matches(queries: &[String]) -> Contexts {
    let mut c = Contexts::default();
    for q in queries {
        match q.as_str() {
            CONTEXT_ALLOCATION => c.allocation = true,
            CONTEXT_CHANGED => c.changed = true,
            _ => {}
        }
    }
    c
}

async fn meta_context<S>(
    s: &mut S,
    exports: &Arc<dyn Exports>,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> Result<(), End>
where
    S: AsyncWrite + Unpin,
{
    let set = option == OPT_SET_META_CONTEXT;
    if set {
        // A SET replaces the previous selection even when it fails.
        st.meta = None;
        if !st.structured {
            let msg = "negotiate structured replies before NBD_OPT_SET_META_CONTEXT";
            return reply(s, option, REP_ERR_INVALID, msg.as_bytes()).await;
        }
    }
    let Some((requested, queries)) = parse_meta(data) else {
        let msg = "malformed metadata context request";
        return reply(s, option, REP_ERR_INVALID, msg.as_bytes()).await;
    };
    let list = list_exports(exports).await;
    let count = list.len();
    let Some((name, _)) = resolve(list, &requested) else {
        let msg = unknown_message(exports, &requested, count);
        return reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes()).await;
    };
    let contexts = if set {
        set_matches(&queries)
    } else {
        list_matches(&queries)
    };
    for (id, ctx) in contexts.selected() {
        // LIST replies carry id 0, as the spec asks.
        let id = if set { id } else { 0 };
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(ctx.as_bytes());
        reply(s, option, REP_META_CONTEXT, &d).await?;
    }
    if set {
        st.meta = Some((name, contexts));
    }
    reply(s, option, REP_ACK, &[]).await
}

//! The client side of the fixed newstyle handshake: greeting and flags,
//! `STRUCTURED_REPLY`, `SET_META_CONTEXT`, then `GO` with the export's size,
//! flags and block sizes; and the option request/reply framing it uses.

use super::*;

impl<S: Read + Write> NbdClient<S> {
    /// Runs the handshake over `stream` (already connected to `peer`, a
    /// name for messages) and opens `export`.
    pub fn handshake(
        stream: S,
        peer: &str,
        export: &str,
        contexts: &[&str],
    ) -> Result<NbdClient<S>> {
        if export.len() > MAX_STRING {
            return Err(Error::invalid(format!(
                "NBD export name of {} bytes is longer than the protocol's {MAX_STRING}",
                export.len()
            )));
        }
        let mut c = NbdClient {
            stream,
            what: format!("NBD export '{}' at {peer}", printable(export)),
            size: 0,
            transmission_flags: 0,
            min_block: 1,
            preferred_block: 4096,
            max_read: MAX_READ_REQUEST,
            max_status: u32::MAX,
            contexts: vec![],
            next_handle: 1,
            broken: None,
            disconnected: false,
        };
        let r = c.negotiate(peer, export, contexts);
        if let Err(e) = r {
            // Nothing to disconnect from: the server is not in transmission.
            c.disconnected = true;
            return Err(e);
        }
        Ok(c)
    }

    fn negotiate(&mut self, peer: &str, export: &str, contexts: &[&str]) -> Result<()> {
        let mut greeting = [0u8; 18];
        self.read_exact(&mut greeting, "the greeting")?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap());
        let opt = u64::from_be_bytes(greeting[8..16].try_into().unwrap());
        if magic != NBDMAGIC {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{peer} is not an NBD server: its greeting starts with {}",
                    printable_bytes(&greeting[0..8])
                ),
            ));
        }
        if opt == OLDSTYLE_MAGIC {
            return Err(self.unsupported(format!(
                "the NBD server at {peer} speaks the oldstyle protocol"
            )));
        }
        if opt != IHAVEOPT {
            return Err(self.violation(format!("bad handshake magic {opt:#018x}")));
        }
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.unsupported(format!(
                "the NBD server at {peer} lacks the fixed newstyle handshake"
            )));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.write_all(&cflags.to_be_bytes(), "the client flags")?;

        // Structured replies are what makes holes and block status work.
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (typ, data) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        if typ != REP_ACK {
            let e = self.option_error(OPT_STRUCTURED_REPLY, typ, &data, "structured replies");
            return Err(e);
        }

        if !contexts.is_empty() {
            self.set_meta_contexts(export, contexts)?;
        }
        self.go(export)
    }

    fn set_meta_contexts(&mut self, export: &str, contexts: &[&str]) -> Result<()> {
        let mut d = vec![];
        put_string(&mut d, export);
        d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts {
            if c.len() > MAX_STRING {
                return Err(Error::invalid(format!(
                    "NBD metadata context name of {} bytes is too long",
                    c.len()
                )));
            }
            put_string(&mut d, c);
        }
        self.send_option(OPT_SET_META_CONTEXT, &d)?;
        loop {
            let (typ, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
            match typ {
                REP_ACK => break,
                REP_META_CONTEXT => {
                    if data.len() < 4 {
                        return Err(self.violation("short NBD_REP_META_CONTEXT".into()));
                    }
                    let id = u32::from_be_bytes(data[0..4].try_into().unwrap());
                    let name = String::from_utf8_lossy(&data[4..]).into_owned();
                    if !contexts.contains(&name.as_str()) {
                        return Err(self.violation(format!(
                            "the server selected the unrequested context '{}'",
                            printable(&name)
                        )));
                    }
                    if self.contexts.iter().any(|(i, n)| *i == id || *n == name) {
                        return Err(self.violation(format!(
                            "the server selected context '{}' (id {id}) twice",
                            printable(&name)
                        )));
                    }
                    if self.contexts.len() >= MAX_CONTEXT_REPLIES {
                        return Err(self.violation("too many metadata contexts".into()));
                    }
                    self.contexts.push((id, name));
                }
                t => {
                    return Err(self.option_error(
                        OPT_SET_META_CONTEXT,
                        t,
                        &data,
                        "metadata contexts",
                    ))
                }
            }
        }
        let missing: Vec<String> = contexts
            .iter()
            .filter(|c| !self.contexts.iter().any(|(_, n)| n == *c))
            .map(|c| format!("'{}'", printable(c)))
            .collect();
        if !missing.is_empty() {
            return Err(Error::not_found(format!(
                "{}: the server does not offer the metadata context {}",
                self.what,
                missing.join(", ")
            )));
        }
        Ok(())
    }

    fn go(&mut self, export: &str) -> Result<()> {
        let mut d = vec![];
        put_string(&mut d, export);
        // Asking for the block sizes promises to honour them.
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &d)?;
        let mut got_export = false;
        loop {
            let (typ, data) = self.option_reply(OPT_GO)?;
            match typ {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() < 2 {
                        return Err(self.violation("short NBD_REP_INFO".into()));
                    }
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    match info {
                        INFO_EXPORT => {
                            if data.len() != 12 {
                                return Err(self.violation(format!(
                                    "NBD_INFO_EXPORT of {} bytes",
                                    data.len()
                                )));
                            }
                            self.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                            self.transmission_flags = u16::from_be_bytes([data[10], data[11]]);
                            got_export = true;
                        }
                        INFO_BLOCK_SIZE => {
                            if data.len() != 14 {
                                return Err(self.violation(format!(
                                    "NBD_INFO_BLOCK_SIZE of {} bytes",
                                    data.len()
                                )));
                            }
                            let be =
                                |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
                            self.block_sizes(be(2), be(6), be(10))?;
                        }
                        // Name, description and later additions: not needed.
                        _ => {}
                    }
                }
                t => return Err(self.option_error(OPT_GO, t, &data, "the export")),
            }
        }
        if !got_export {
            return Err(self.violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()));
        }
        if self.transmission_flags & FLAG_HAS_FLAGS == 0 {
            return Err(self.violation("transmission flags lack NBD_FLAG_HAS_FLAGS".into()));
        }
        if self.size % u64::from(self.min_block) != 0 {
            return Err(self.violation(format!(
                "export size {} is not a multiple of the minimum block size {}",
                self.size, self.min_block
            )));
        }
        Ok(())
    }

    /// Checks and keeps the server's block size constraints.
    fn block_sizes(&mut self, min: u32, preferred: u32, max: u32) -> Result<()> {
        let ok = min.is_power_of_two()
            && min <= 64 << 10
            && preferred.is_power_of_two()
            && preferred >= min
            && max >= min
            && (max == u32::MAX || max % min == 0);
        if !ok {
            return Err(self.violation(format!(
                "block sizes min {min}, preferred {preferred}, max {max} break the spec's rules"
            )));
        }
        self.min_block = min;
        self.preferred_block = preferred;
        self.max_read = max.min(MAX_READ_REQUEST) / min * min;
        self.max_status = u32::MAX / min * min;
        Ok(())
    }

    /// Caps the request sizes below the server's, so that tests see
    /// reads split and block status asked again.
    #[cfg(test)]
    pub(super) fn limit_requests(&mut self, read: u32, status: u32) {
        let min = self.min_block;
        self.max_read = self.max_read.min(read / min * min);
        self.max_status = self.max_status.min(status / min * min);
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.write_all(&option_request(option, data), option_name(option))
    }

    /// Reads one option reply to `option`: (type, data).
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        let what = option_name(option);
        self.read_exact(&mut h, what)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        if magic != OPTION_REPLY_MAGIC {
            return Err(self.violation(format!("bad option reply magic {magic:#018x} to {what}")));
        }
        if opt != option {
            return Err(self.violation(format!("a reply to option {opt} while waiting for {what}")));
        }
        if len > MAX_OPTION_REPLY {
            return Err(self.violation(format!("an option reply of {len} bytes to {what}")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data, what)?;
        Ok((typ, data))
    }

    /// The error for an option reply of type `typ` that is not the one
    /// expected; tells the server we give up (best effort).
    fn option_error(&mut self, option: u32, typ: u32, data: &[u8], what: &str) -> Error {
        if typ & (1 << 31) == 0 {
            return self.violation(format!(
                "unexpected reply type {typ} to {}",
                option_name(option)
            ));
        }
        let msg = printable(&String::from_utf8_lossy(data));
        let msg = if msg.is_empty() {
            String::new()
        } else {
            format!(": {msg}")
        };
        let _ = self.send_option(OPT_ABORT, &[]);
        let kind = match typ {
            REP_ERR_UNKNOWN => ErrorKind::NotFound,
            REP_ERR_POLICY | REP_ERR_TLS_REQD => ErrorKind::NotPermitted,
            REP_ERR_INVALID | REP_ERR_UNSUP | REP_ERR_BLOCK_SIZE_REQD | REP_ERR_TOO_BIG => {
                ErrorKind::InvalidInput
            }
            _ => ErrorKind::Io,
        };
        let reason = match typ {
            REP_ERR_UNKNOWN => "unknown export",
            REP_ERR_UNSUP => "unsupported",
            REP_ERR_POLICY => "forbidden by policy",
            REP_ERR_INVALID => "invalid",
            REP_ERR_PLATFORM => "unsupported on the server's platform",
            REP_ERR_TLS_REQD => "TLS required",
            REP_ERR_SHUTDOWN => "the server is shutting down",
            REP_ERR_BLOCK_SIZE_REQD => "block sizes must be negotiated",
            REP_ERR_TOO_BIG => "too big",
            _ => "error",
        };
        Error::new(
            kind,
            format!(
                "{}: the server refused {what} ({}: {reason}){msg}",
                self.what,
                option_name(option)
            ),
        )
    }
}

/// Appends a u32-length-prefixed string.
fn put_string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn option_name(option: u32) -> &'static str {
    match option {
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_GO => "NBD_OPT_GO",
        OPT_ABORT => "NBD_OPT_ABORT",
        _ => "an option",
    }
}

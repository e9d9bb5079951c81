//! A JSON document sealed with its BLAKE3 checksum:
//! `{"checksum": "<hex>", "<field>": <body>}`. The checksum covers the body's
//! exact bytes, so a truncated or edited object is caught before use. In an
//! encrypted repository it is a keyed MAC instead, `{"mac": "<hex>", ...}`,
//! so a forged one is caught too (`repo::crypto`).
//!
//! A document whose body must not be readable in the store (a file
//! backup's catalog) is encrypted instead ([`seal_encrypted`]):
//! `{"aead": "xchacha20poly1305", "<field>": "<base64 of nonce ‖
//! ciphertext+tag>"}`, authenticated by the AEAD's tag and bound to the
//! object key it is stored under.

use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::HashMap;

use super::crypto::Keys;
use crate::error::{Error, Result};

const AEAD: &str = "xchacha20poly1305";

/// Encodes `body` under `field` with its checksum.
pub fn seal(field: &str, body: &impl Serialize) -> Result<Vec<u8>> {
    seal_with(field, body, None)
}

/// Checks and decodes a sealed document; `what` names it in errors.
pub fn unseal<T: DeserializeOwned>(bytes: &[u8], field: &str, what: &str) -> Result<T> {
    unseal_with(bytes, field, what, None)
}

/// [`seal`]; with `keys`, a keyed MAC instead of the checksum.
pub fn seal_with(field: &str, body: &impl Serialize, keys: Option<&Keys>) -> Result<Vec<u8>> {
    let body =
        serde_json::to_string(body).map_err(|e| Error::invalid(format!("encode {field}: {e}")))?;
    let (name, sum) = match keys {
        Some(k) => ("mac", k.mac(field, body.as_bytes())),
        None => ("checksum", blake3::hash(body.as_bytes())),
    };
    let field = serde_json::to_string(field).expect("a string encodes");
    Ok(format!("{{\"{name}\":\"{}\",{field}:{body}}}\n", sum.to_hex()).into_bytes())
}

/// [`unseal`]; with `keys`, the document must carry a valid MAC.
pub fn unseal_with<T: DeserializeOwned>(
    bytes: &[u8],
    field: &str,
    what: &str,
    keys: Option<&Keys>,
) -> Result<T> {
    let env = envelope(bytes, what)?;
    decode_body(checked_body(&env, field, what, keys)?, what)
}

/// [`seal_with`] with the body encrypted under `keys`, for storage at
/// `object` (it fails to open anywhere else).
pub fn seal_encrypted(
    field: &str,
    body: &impl Serialize,
    keys: &Keys,
    object: &str,
) -> Result<Vec<u8>> {
    let plain =
        serde_json::to_vec(body).map_err(|e| Error::invalid(format!("encode {field}: {e}")))?;
    let sealed = keys.seal_document(field, object, &plain)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(sealed);
    let field = serde_json::to_string(field).expect("a string encodes");
    Ok(format!("{{\"aead\":\"{AEAD}\",{field}:\"{b64}\"}}\n").into_bytes())
}

/// How a stored document was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// [`seal_encrypted`].
    Encrypted,
    /// [`seal_with`]: readable by anyone who can read the store.
    Plain,
}

/// Decodes a document stored at `object` in either form. With `keys`, an
/// encrypted one must open under them and a plain one must carry their
/// MAC (a checksum anyone could write is refused); without, an encrypted
/// one is refused.
pub fn unseal_stored<T: DeserializeOwned>(
    bytes: &[u8],
    field: &str,
    what: &str,
    keys: Option<&Keys>,
    object: &str,
) -> Result<(T, Form)> {
    let env = envelope(bytes, what)?;
    let Some(aead) = env.get("aead") else {
        let body = checked_body(&env, field, what, keys)?;
        return Ok((decode_body(body, what)?, Form::Plain));
    };
    let Some(keys) = keys else {
        return Err(Error::corrupt(format!(
            "{what} is encrypted, but the repository is not: it was not written here"
        )));
    };
    let aead: &str = serde_json::from_str(aead.get())
        .map_err(|_| Error::corrupt(format!("{what} names a malformed cipher")))?;
    if aead != AEAD {
        return Err(Error::corrupt(format!(
            "{what} is encrypted with unknown cipher {aead:?}"
        )));
    }
    let Some(body) = env.get(field) else {
        return Err(Error::corrupt(format!("{what} is damaged or truncated")));
    };
    let b64: &str = serde_json::from_str(body.get())
        .map_err(|_| Error::corrupt(format!("{what} is damaged (its body is not a string)")))?;
    let mut stored = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| Error::corrupt(format!("{what} is damaged (its body is not base64)")))?;
    let plain = keys.open_document(field, object, &mut stored, what)?;
    let doc = serde_json::from_slice(plain)
        .map_err(|e| Error::corrupt(format!("{what} is malformed ({e})")))?;
    Ok((doc, Form::Encrypted))
}

type Envelope = HashMap<String, Box<RawValue>>;

fn envelope(bytes: &[u8], what: &str) -> Result<Envelope> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("{what} is damaged or truncated ({e})")))
}

/// The body under `field`, once its checksum or (with `keys`) MAC holds.
fn checked_body<'a>(
    env: &'a Envelope,
    field: &str,
    what: &str,
    keys: Option<&Keys>,
) -> Result<&'a RawValue> {
    let Some(body) = env.get(field) else {
        return Err(Error::corrupt(format!("{what} is damaged or truncated")));
    };
    let name = if keys.is_some() { "mac" } else { "checksum" };
    let Some(sum) = env.get(name) else {
        return Err(match keys {
            Some(_) => Error::corrupt(format!(
                "{what} carries no MAC: forged, or not written with this repository's key"
            )),
            None => Error::corrupt(format!("{what} is damaged or truncated")),
        });
    };
    let malformed = || {
        Error::corrupt(match keys {
            Some(_) => format!("{what} has a malformed MAC (forged or damaged)"),
            None => format!("{what} has a malformed checksum"),
        })
    };
    let want: &str = serde_json::from_str(sum.get()).map_err(|_| malformed())?;
    let want = blake3::Hash::from_hex(want).map_err(|_| malformed())?;
    let got = match keys {
        Some(k) => k.mac(field, body.get().as_bytes()),
        None => blake3::hash(body.get().as_bytes()),
    };
    // blake3::Hash's == is constant-time: no timing hint for a forger.
    if got != want {
        return Err(Error::corrupt(match keys {
            Some(_) => format!("{what} fails its MAC (forged or damaged)"),
            None => format!("{what} fails its checksum"),
        }));
    }
    Ok(body)
}

fn decode_body<T: DeserializeOwned>(body: &RawValue, what: &str) -> Result<T> {
    serde_json::from_str(body.get())
        .map_err(|e| Error::corrupt(format!("{what} is malformed ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_document_round_trips_and_any_edit_is_caught() {
        let v = serde_json::json!({"a": [1, 2, 3], "b": "x"});
        let s = seal("doc", &v).unwrap();
        assert_eq!(unseal::<serde_json::Value>(&s, "doc", "t").unwrap(), v);
        let edited = String::from_utf8(s.clone())
            .unwrap()
            .replace("[1,2,3]", "[1,2,4]");
        let e = unseal::<serde_json::Value>(edited.as_bytes(), "doc", "t").unwrap_err();
        assert!(e.to_string().contains("fails its checksum"), "{e}");
        let e = unseal::<serde_json::Value>(&s[..s.len() / 2], "doc", "t").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn a_wrong_or_malformed_mac_or_checksum_is_refused() {
        let keys = Keys::generate();
        let v = serde_json::json!({"a": 1});
        let check = |keys: Option<&Keys>, name: &str, want: &str| {
            let s = String::from_utf8(seal_with("doc", &v, keys).unwrap()).unwrap();
            let env: serde_json::Value = serde_json::from_str(&s).unwrap();
            let good = env[name].as_str().unwrap().to_string();
            assert_eq!(
                unseal_with::<serde_json::Value>(s.as_bytes(), "doc", "t", keys).unwrap(),
                v
            );
            // Another valid-looking sum, one too short, one not hex.
            let mut flipped = good.clone().into_bytes();
            flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
            let flipped = String::from_utf8(flipped).unwrap();
            for bad in [flipped, good[..62].to_string(), "zz".repeat(32)] {
                if bad == good {
                    continue;
                }
                let doc = s.replace(&good, &bad);
                let e =
                    unseal_with::<serde_json::Value>(doc.as_bytes(), "doc", "t", keys).unwrap_err();
                assert!(e.to_string().contains(want), "{bad}: {e}");
            }
        };
        check(None, "checksum", "checksum");
        check(Some(&keys), "mac", "MAC");
        // Another key's MAC is refused too.
        let s = seal_with("doc", &v, Some(&keys)).unwrap();
        let other = Keys::generate();
        assert!(unseal_with::<serde_json::Value>(&s, "doc", "t", Some(&other)).is_err());
    }
}

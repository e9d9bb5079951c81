//! A JSON document sealed with its BLAKE3 checksum:
//! `{"checksum": "<hex>", "<field>": <body>}`. The checksum covers the body's
//! exact bytes, so a truncated or edited object is caught before use. In an
//! encrypted repository it is a keyed MAC instead, `{"mac": "<hex>", ...}`,
//! so a forged one is caught too (`repo::crypto`).

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::HashMap;

use super::crypto::Keys;
use crate::error::{Error, Result};

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
        None => (
            "checksum",
            blake3::hash(body.as_bytes()).to_hex().to_string(),
        ),
    };
    let field = serde_json::to_string(field).expect("a string encodes");
    Ok(format!("{{\"{name}\":\"{sum}\",{field}:{body}}}\n").into_bytes())
}

/// [`unseal`]; with `keys`, the document must carry a valid MAC.
pub fn unseal_with<T: DeserializeOwned>(
    bytes: &[u8],
    field: &str,
    what: &str,
    keys: Option<&Keys>,
) -> Result<T> {
    let env: HashMap<String, Box<RawValue>> = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("{what} is damaged or truncated ({e})")))?;
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
    let want: String = serde_json::from_str(sum.get())
        .map_err(|_| Error::corrupt(format!("{what} has a malformed {name}")))?;
    let got = match keys {
        Some(k) => k.mac(field, body.get().as_bytes()),
        None => blake3::hash(body.get().as_bytes()).to_hex().to_string(),
    };
    if got != want {
        return Err(Error::corrupt(match keys {
            Some(_) => format!("{what} fails its MAC (forged or damaged)"),
            None => format!("{what} fails its checksum"),
        }));
    }
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
}

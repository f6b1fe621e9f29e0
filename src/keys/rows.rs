//! A key's row in the key-value table: every mirrored type as text or JSON (see the
//! encoding rules in `encode`), and what is said of keys the table refuses.

use ::redis::Value;

use super::memory::KeyIds;
use super::writer::KeyRow;
use crate::encode::{encode_name, value_text, Value as Val};
use crate::redis::bulk_list;
use crate::redis::KeyMeta;
use crate::shmem;

/// Keys the table refused (a name too long for its index, a trigger that raises): reported
/// in the log and `last_error`; they hold up nothing else.
pub fn report_refused(db: u8, rows: &[KeyRow], refused: &[(usize, crate::error::SyncError)]) {
    for (i, e) in refused {
        let name: String = rows[*i].redis_key.chars().take(200).collect();
        let msg = format!("key \"{name}\" of Redis database {db} cannot be stored: {e}");
        shmem::record_error(&msg);
        pgrx::warning!("{msg}");
    }
}

/// A key as a pass or a notification found it, made ready for the main thread on the thread
/// that read it (so that the main thread only compares and writes).
#[derive(Debug)]
pub enum Found {
    /// A mirrored type: the fingerprint of what Redis holds, and its row.
    Value { fingerprint: u64, row: KeyRow },
    /// A stream: stream sync's.
    Stream,
    /// Gone (deleted or expired) by the time it was read.
    Gone,
    /// A type not mirrored (a module's), or changed while read: nothing to write now.
    Other,
    /// Bigger than `redis_sync.key_value_max_size`: not fetched, not written, reported.
    TooBig { ty: String, bytes: u64 },
}

/// What to do with a key Redis described as `meta`.
pub fn prepare(ids: &KeyIds, key: &[u8], meta: KeyMeta, text: bool) -> Found {
    let KeyMeta { ty, expires, value, too_big } = meta;
    if let Some(bytes) = too_big {
        return Found::TooBig { ty, bytes };
    }
    match ty.as_str() {
        "stream" => return Found::Stream,
        "none" => return Found::Gone,
        _ => {}
    }
    let Some(value) = value else { return Found::Other };
    let fingerprint = ids.fingerprint(&ty, expires, &value);
    match key_row(key, &ty, expires, value, text) {
        Some(row) => Found::Value { fingerprint, row },
        None => Found::Other,
    }
}

/// The types mirrored into the key-value table.
pub const MIRRORED: [&str; 5] = ["string", "hash", "list", "set", "zset"];

/// `[a, 1, b, 2]` -> `[(a, 1), (b, 2)]` (hash fields, sorted-set members with scores).
fn pairs(flat: Vec<Vec<u8>>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut it = flat.into_iter();
    let mut out = Vec::new();
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        out.push((a, b));
    }
    out
}

/// The row of one key, or `None` for a type that is not mirrored.
pub fn key_row(
    key: &[u8],
    ty: &str,
    expires_ms: Option<i64>,
    value: Value,
    text: bool,
) -> Option<KeyRow> {
    let mut fields = None;
    let (value_type, (stored, encoding)) = match ty {
        "string" => {
            let bytes = match value {
                Value::BulkString(b) => b,
                Value::SimpleString(s) => s.into_bytes(),
                // The key changed type or vanished between the two round trips.
                _ => return None,
            };
            ("string", value_text(Val::String(&bytes)))
        }
        "hash" => {
            let pairs = pairs(bulk_list(value));
            // A hash a route takes needs no text (see `KeyRow::fill_text`).
            let json = if text { value_text(Val::Hash(&pairs)) } else { (String::new(), None) };
            fields = Some(crate::redis::Fields::from_pairs(&pairs));
            ("hash", json)
        }
        "list" => ("list", value_text(Val::List(&bulk_list(value)))),
        "set" => ("set", value_text(Val::Set(&bulk_list(value)))),
        "zset" => ("zset", value_text(Val::ZSet(&pairs(bulk_list(value))))),
        _ => return None,
    };
    Some(KeyRow {
        // A key a route takes needs no encoded name either.
        redis_key: if text { encode_name(key) } else { String::new() },
        redis_value: stored,
        value_type,
        value_encoding: encoding,
        expires_ms,
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn rows_of_each_type() {
        let r = key_row(b"k", "string", Some(5), bulk(b"v"), true).expect("row");
        assert_eq!(
            (r.redis_value.as_str(), r.value_type, r.value_encoding, r.expires_ms),
            ("v", "string", None, Some(5))
        );
        let h = key_row(b"h", "hash", None, Value::Array(vec![bulk(b"a"), bulk(b"1")]), true)
            .expect("row");
        assert_eq!(h.redis_value, r#"{"a":"1"}"#);
        // Read for a route: no text, written from the fields when the mirror takes it.
        let mut bare =
            key_row(b"h", "hash", None, Value::Array(vec![bulk(b"a"), bulk(b"1")]), false)
                .expect("row");
        assert_eq!(bare.redis_value, "");
        assert_eq!(bare.redis_key, "");
        bare.fill_text(b"h");
        assert_eq!(bare, h);
        let z = key_row(b"z", "zset", None, Value::Array(vec![bulk(b"m"), bulk(b"2.5")]), true)
            .expect("row");
        assert_eq!(z.redis_value, r#"[["m",2.5]]"#);
        assert!(key_row(b"s", "stream", None, Value::Nil, true).is_none());
        assert!(key_row(b"gone", "string", None, Value::Nil, true).is_none());
        assert_eq!(
            key_row(b"$x", "set", None, Value::Array(vec![]), true).expect("row").redis_key,
            "$$x"
        );
    }
}

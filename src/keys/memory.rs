//! What the worker remembers of every key it mirrored, between passes: a fingerprint of
//! what the table holds for it and the number of the last pass that saw it, packed in one
//! word per key (24 bytes a key with its id in a hash table, up to twice that with the
//! table's spare room).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use ::redis::Value;

/// A key in memory: a 128-bit keyed hash of its database and name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyId(u64, u64);

impl Hash for KeyId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: its first half is a good bucket index as it is.
        state.write_u64(self.0);
    }
}

/// The hasher of [`KeyId`]s: passes the first half through.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Per key: a 48-bit fingerprint of what the table holds for it, and the 16-bit number of
/// the last pass that saw it (packed in one word: 24 bytes a key with the id).
pub type Memory = HashMap<KeyId, u64, BuildHasherDefault<IdHasher>>;

pub fn pack(fingerprint: u64, pass: u16) -> u64 {
    fingerprint << 16 | u64::from(pass)
}

pub fn pass_of(v: u64) -> u16 {
    v as u16
}

pub fn fingerprint_of(v: u64) -> u64 {
    v >> 16
}

/// Makes [`KeyId`]s: two keyed hashes of database and name, keyed per process.
pub struct KeyIds(RandomState);

impl KeyIds {
    pub fn new() -> KeyIds {
        KeyIds(RandomState::new())
    }

    pub fn id(&self, db: u8, name: &[u8]) -> KeyId {
        KeyId(self.0.hash_one((0u8, db, name)), self.0.hash_one((1u8, db, name)))
    }
}

/// A fingerprint no value has (see [`fingerprint`]).
pub const NO_FINGERPRINT: u64 = 0;

/// A 48-bit fingerprint of a key's type, expiry and value as Redis sent them (never 0).
pub fn fingerprint(ty: &str, expires_ms: Option<i64>, value: &Value) -> u64 {
    fn feed(v: &Value, h: &mut std::collections::hash_map::DefaultHasher) {
        match v {
            Value::BulkString(b) => (0u8, b).hash(h),
            Value::SimpleString(s) => (1u8, s).hash(h),
            Value::Int(i) => (2u8, i).hash(h),
            Value::Double(d) => (3u8, d.to_bits()).hash(h),
            Value::Array(items) | Value::Set(items) => {
                (4u8, items.len()).hash(h);
                items.iter().for_each(|i| feed(i, h));
            }
            Value::Map(pairs) => {
                (5u8, pairs.len()).hash(h);
                pairs.iter().for_each(|(k, v)| {
                    feed(k, h);
                    feed(v, h);
                });
            }
            Value::Nil => 6u8.hash(h),
            other => (7u8, format!("{other:?}")).hash(h),
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (ty, expires_ms).hash(&mut h);
    feed(value, &mut h);
    (h.finish() >> 16).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn key_ids_separate_databases_and_names() {
        let k = KeyIds::new();
        assert!(k.id(0, b"a") != k.id(1, b"a"));
        assert!(k.id(0, b"a") != k.id(0, b"b"));
        assert!(k.id(3, b"x") == k.id(3, b"x"));
    }

    #[test]
    fn fingerprints_follow_type_expiry_and_value() {
        let v = bulk(b"v");
        let base = fingerprint("string", None, &v);
        assert_eq!(base, fingerprint("string", None, &bulk(b"v")));
        assert_ne!(base, fingerprint("string", Some(1), &v));
        assert_ne!(base, fingerprint("string", None, &bulk(b"w")));
        let list = |items: &[&[u8]]| Value::Array(items.iter().map(|b| bulk(b)).collect());
        assert_ne!(
            fingerprint("list", None, &list(&[b"ab", b"c"])),
            fingerprint("list", None, &list(&[b"a", b"bc"]))
        );
        assert_ne!(
            fingerprint("list", None, &list(&[b"v"])),
            fingerprint("set", None, &list(&[b"v"]))
        );
        assert!(base < 1 << 48);
    }

    #[test]
    fn memory_word_keeps_fingerprint_and_pass() {
        let w = pack((1 << 48) - 1, 7);
        assert_eq!((fingerprint_of(w), pass_of(w)), ((1 << 48) - 1, 7));
    }
}

//! What the worker remembers of every key it mirrored, between passes: a fingerprint of
//! what the table holds for it and the number of the last pass that saw it (32 bytes a key
//! with its id in a hash table, up to twice that with the table's spare room).
//!
//! Ids and fingerprints are keyed hashes (SipHash with keys drawn at random by each worker
//! process, 64 bits wide): whoever can write values cannot compute which values collide,
//! so cannot hide a change from the worker.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use ::redis::Value;

/// A key in memory: a 128-bit keyed hash of its database and name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyId(u64, u64);

impl KeyId {
    pub fn pair(self) -> (u64, u64) {
        (self.0, self.1)
    }
}

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

/// What is remembered of a key: the fingerprint of what the table holds for it, and the
/// number of the last pass that saw it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Remembered {
    fingerprint: u64,
    pass: u16,
}

pub type Memory = HashMap<KeyId, Remembered, BuildHasherDefault<IdHasher>>;

pub fn pack(fingerprint: u64, pass: u16) -> Remembered {
    Remembered { fingerprint, pass }
}

pub fn pass_of(v: Remembered) -> u16 {
    v.pass
}

pub fn fingerprint_of(v: Remembered) -> u64 {
    v.fingerprint
}

/// Remembers what the table holds for a key, unless the memory already holds `cap` other
/// keys (a key not remembered is compared with the table at every pass). Returns whether
/// it is remembered.
pub fn remember(memory: &mut Memory, cap: usize, id: KeyId, fingerprint: u64, pass: u16) -> bool {
    if let Some(v) = memory.get_mut(&id) {
        *v = pack(fingerprint, pass);
        return true;
    }
    if memory.len() >= cap {
        return false;
    }
    memory.insert(id, pack(fingerprint, pass));
    true
}

/// Makes [`KeyId`]s and fingerprints: keyed hashes, keyed per process.
pub struct KeyIds(RandomState);

impl KeyIds {
    pub fn new() -> KeyIds {
        KeyIds(RandomState::new())
    }

    pub fn id(&self, db: u8, name: &[u8]) -> KeyId {
        KeyId(self.0.hash_one((0u8, db, name)), self.0.hash_one((1u8, db, name)))
    }

    /// A 64-bit fingerprint of a key's type, expiry and value as Redis sent them (never
    /// [`NO_FINGERPRINT`] or [`TOO_BIG`]).
    pub fn fingerprint(&self, ty: &str, expires_ms: Option<i64>, value: &Value) -> u64 {
        fn feed<H: Hasher>(v: &Value, h: &mut H) {
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
        let mut h = self.0.build_hasher();
        (2u8, ty, expires_ms).hash(&mut h);
        feed(value, &mut h);
        h.finish().max(2)
    }
}

/// A fingerprint no value has (see [`KeyIds::fingerprint`]): the key is compared with the
/// table at the next pass.
pub const NO_FINGERPRINT: u64 = 0;
/// What is remembered of a key too big to mirror: seen, not written, already reported.
pub const TOO_BIG: u64 = 1;

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
        let k = KeyIds::new();
        let fingerprint = |t: &str, e: Option<i64>, v: &Value| k.fingerprint(t, e, v);
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
        assert_ne!(base, NO_FINGERPRINT);
    }

    #[test]
    fn fingerprints_are_keyed_per_process() {
        // Another worker process (another key) gives other fingerprints of the same values:
        // nobody can compute a collision ahead of time.
        let (a, b) = (KeyIds::new(), KeyIds::new());
        let v = bulk(b"same value");
        assert_eq!(a.fingerprint("string", None, &v), a.fingerprint("string", None, &v));
        assert_ne!(a.fingerprint("string", None, &v), b.fingerprint("string", None, &v));
        // 64 bits: the high half is used.
        let high = (0..64u8)
            .map(|i| a.fingerprint("string", None, &bulk(&[i])))
            .filter(|f| *f >> 48 != 0)
            .count();
        assert!(high > 60, "{high}");
    }

    #[test]
    fn memory_stops_growing_at_its_cap() {
        let k = KeyIds::new();
        let mut m = Memory::default();
        assert!(remember(&mut m, 2, k.id(0, b"a"), 5, 1));
        assert!(remember(&mut m, 2, k.id(0, b"b"), 5, 1));
        // Full: a new key is not remembered, a known one is updated.
        assert!(!remember(&mut m, 2, k.id(0, b"c"), 5, 1));
        assert!(remember(&mut m, 2, k.id(0, b"a"), 9, 2));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(&k.id(0, b"a")).copied(), Some(pack(9, 2)));
        let mut none = Memory::default();
        assert!(!remember(&mut none, 0, k.id(0, b"z"), 5, 1));
        assert!(none.is_empty());
    }

    #[test]
    fn memory_keeps_fingerprint_and_pass() {
        let w = pack(u64::MAX, 7);
        assert_eq!((fingerprint_of(w), pass_of(w)), (u64::MAX, 7));
    }
}

//! Pure parsing of Redis replies (RESP2 and RESP3 shapes alike) into the worker's types:
//! stream entries, SCAN pages, XINFO figures. No I/O here; everything is unit-tested.

use ::redis::Value;

use super::fields::Fields;

/// One stream entry as read: its ID and its fields, or `None` when the entry was deleted
/// while it sat in the pending list (Redis then returns no fields).
#[derive(Debug, Clone, PartialEq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Option<Fields>,
}

/// What a pass learns about a key: its type (`none` when gone), absolute expiry in Unix
/// milliseconds, and its value, unless it is bigger than the limit (then `too_big` holds
/// its size, or an estimate).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyMeta {
    pub ty: String,
    pub expires: Option<i64>,
    pub value: Option<Value>,
    pub too_big: Option<u64>,
}

/// What XINFO says about one stream and our group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamInfo {
    pub length: i64,
    pub first_entry_id: Option<String>,
    pub last_entry_id: Option<String>,
    pub pending: i64,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell.
    pub lag: Option<i64>,
    pub consumers: i64,
    pub group_exists: bool,
    /// Consumer groups of the stream (all of them, not only ours).
    pub groups: i64,
    /// With consumers asked for: the consumer of our group idle longest while holding
    /// pending entries, as (name, idle ms, pending).
    pub stalled_consumer: Option<(String, i64, i64)>,
}

/// A reply of bulk strings (array, set or map flattened), as byte strings.
pub fn bulk_list(v: Value) -> Vec<Vec<u8>> {
    match v {
        Value::Array(items) | Value::Set(items) => {
            items.into_iter().filter_map(into_bytes).collect()
        }
        Value::Map(pairs) => {
            pairs.into_iter().flat_map(|(k, v)| [k, v]).filter_map(into_bytes).collect()
        }
        other => into_bytes(other).into_iter().collect(),
    }
}

fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Double(d) => Some(d.to_string().into_bytes()),
        _ => None,
    }
}

pub(super) fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::VerbatimString { text, .. } => Some(text.clone()),
        other => as_bytes(other).map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

pub(super) fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

pub(super) fn parse_scan(reply: Value) -> Option<(u64, Vec<Vec<u8>>)> {
    let Value::Array(mut parts) = reply else { return None };
    if parts.len() != 2 {
        return None;
    }
    let keys = match parts.pop()? {
        Value::Array(keys) => keys
            .into_iter()
            .filter_map(|k| match k {
                Value::BulkString(b) => Some(b),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    let cursor = as_string(&parts[0])?.parse().ok()?;
    Some((cursor, keys))
}

/// Parses an XREADGROUP reply (RESP2 array or RESP3 map; nil when nothing came).
pub fn parse_read(reply: Value) -> Option<Vec<(Vec<u8>, Vec<RawEntry>)>> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Nil => return Some(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    let key = kv.pop()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect::<Option<_>>()?,
        Value::Map(pairs) => pairs,
        _ => return None,
    };
    pairs
        .into_iter()
        .map(|(key, entries)| {
            let Value::BulkString(key) = key else { return None };
            let Value::Array(entries) = entries else { return None };
            let entries = entries.into_iter().map(parse_entry).collect::<Option<Vec<_>>>()?;
            Some((key, entries))
        })
        .collect()
}

fn parse_entry(v: Value) -> Option<RawEntry> {
    let Value::Array(mut parts) = v else { return None };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id = match parts.pop()? {
        // Taken, not copied (an entry ID is ASCII).
        Value::BulkString(b) => String::from_utf8(b)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        other => as_string(&other)?,
    };
    let fields = match fields {
        Value::Nil => None,
        Value::Array(flat) if flat.len() % 2 == 0 => {
            let mut out = Fields::default();
            for part in &flat {
                let Value::BulkString(b) = part else { return None };
                out.push_part(b);
            }
            Some(out)
        }
        Value::Map(pairs) => {
            let mut out = Fields::default();
            for (n, v) in &pairs {
                let (Value::BulkString(n), Value::BulkString(v)) = (n, v) else { return None };
                out.push_part(n);
                out.push_part(v);
            }
            Some(out)
        }
        _ => return None,
    };
    Some(RawEntry { id, fields })
}

/// Field/value pairs of an XINFO reply (flat array in RESP2, map in RESP3).
fn info_pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|p| match p {
                [k, v] => as_string(k).map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => {
            pairs.iter().filter_map(|(k, v)| as_string(k).map(|k| (k, v))).collect()
        }
        _ => Vec::new(),
    }
}

fn entry_id_of(v: &Value) -> Option<String> {
    match v {
        Value::Array(parts) => parts.first().and_then(as_string),
        _ => None,
    }
}

/// The consumer idle longest among those holding pending entries, other than `ours` (in
/// monitor mode our own consumer is idle on purpose).
pub(super) fn stalled_consumer(consumers: &Value, ours: &str) -> Option<(String, i64, i64)> {
    let Value::Array(list) = consumers else { return None };
    list.iter()
        .filter_map(|c| {
            let pairs = info_pairs(c);
            let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            let pending = get("pending").and_then(as_int).unwrap_or(0);
            let idle = get("idle").and_then(as_int).unwrap_or(0);
            let name = get("name").and_then(as_string).unwrap_or_default();
            (pending > 0 && name != ours).then_some((name, idle, pending))
        })
        .max_by_key(|(_, idle, _)| *idle)
}

/// How long consumer `name` has been idle (ms), from an `XINFO CONSUMERS` reply; `None` when
/// the group has no such consumer.
pub(super) fn consumer_idle(consumers: &Value, name: &str) -> Option<i64> {
    let Value::Array(list) = consumers else { return None };
    list.iter().find_map(|c| {
        let pairs = info_pairs(c);
        let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
        (get("name").and_then(as_string).as_deref() == Some(name))
            .then(|| get("idle").and_then(as_int).unwrap_or(0))
    })
}

/// The names of the groups in an `XINFO GROUPS` reply.
pub(super) fn group_names(groups: &Value) -> Vec<String> {
    let Value::Array(groups) = groups else { return Vec::new() };
    groups
        .iter()
        .filter_map(|g| {
            info_pairs(g).into_iter().find(|(k, _)| k == "name").and_then(|(_, v)| as_string(v))
        })
        .collect()
}

pub(super) fn parse_info(stream: &Value, groups: &Value, group: &str) -> StreamInfo {
    let mut info = StreamInfo::default();
    for (k, v) in info_pairs(stream) {
        match k.as_str() {
            "length" => info.length = as_int(v).unwrap_or(0),
            "first-entry" => info.first_entry_id = entry_id_of(v),
            "last-entry" => info.last_entry_id = entry_id_of(v),
            _ => {}
        }
    }
    if let Value::Array(groups) = groups {
        info.groups = groups.len() as i64;
        for g in groups {
            let pairs = info_pairs(g);
            let name = pairs.iter().find(|(k, _)| k == "name").and_then(|(_, v)| as_string(v));
            if name.as_deref() != Some(group) {
                continue;
            }
            info.group_exists = true;
            for (k, v) in &pairs {
                match k.as_str() {
                    "pending" => info.pending = as_int(v).unwrap_or(0),
                    "consumers" => info.consumers = as_int(v).unwrap_or(0),
                    "lag" => info.lag = as_int(v),
                    _ => {}
                }
            }
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn read_reply_with_deleted_entry() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"s1"),
            Value::Array(vec![
                Value::Array(vec![bulk(b"1-0"), Value::Array(vec![bulk(b"a"), bulk(b"\xff")])]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let got = parse_read(reply).expect("parsed");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, b"s1");
        assert_eq!(got[0].1[0].fields, Some(Fields::from_pairs(&[(b"a", b"\xff")])));
        assert_eq!(got[0].1[1], RawEntry { id: "2-0".into(), fields: None });
        assert_eq!(parse_read(Value::Nil), Some(vec![]));
        assert_eq!(parse_read(Value::Int(3)), None);
    }

    #[test]
    fn a_consumer_s_idle_time_is_found_by_name() {
        let consumer = |name: &[u8], idle: i64| {
            Value::Array(vec![
                bulk(b"name"),
                bulk(name),
                bulk(b"pending"),
                Value::Int(0),
                bulk(b"idle"),
                Value::Int(idle),
            ])
        };
        let list = Value::Array(vec![consumer(b"ours", 5), consumer(b"redis-pg-sync-1", 12_000)]);
        assert_eq!(consumer_idle(&list, "redis-pg-sync-1"), Some(12_000));
        assert_eq!(consumer_idle(&list, "ours"), Some(5));
        assert_eq!(consumer_idle(&list, "absent"), None);
        assert_eq!(consumer_idle(&Value::Nil, "ours"), None);
    }

    #[test]
    fn info_reply() {
        let stream = Value::Array(vec![
            bulk(b"length"),
            Value::Int(3),
            bulk(b"first-entry"),
            Value::Array(vec![bulk(b"1-0"), Value::Array(vec![])]),
            bulk(b"last-entry"),
            Value::Array(vec![bulk(b"3-0"), Value::Array(vec![])]),
        ]);
        let groups = Value::Array(vec![Value::Array(vec![
            bulk(b"name"),
            bulk(b"g"),
            bulk(b"consumers"),
            Value::Int(2),
            bulk(b"pending"),
            Value::Int(1),
            bulk(b"lag"),
            Value::Int(0),
        ])]);
        let i = parse_info(&stream, &groups, "g");
        assert_eq!(i.length, 3);
        assert_eq!(i.first_entry_id.as_deref(), Some("1-0"));
        assert_eq!(i.last_entry_id.as_deref(), Some("3-0"));
        assert_eq!((i.pending, i.consumers, i.lag, i.group_exists), (1, 2, Some(0), true));
        assert!(!parse_info(&stream, &groups, "other").group_exists);
    }
}

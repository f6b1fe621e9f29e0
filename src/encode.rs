//! Lossless encoding of Redis bytes into Postgres text and JSON, and back.
//!
//! Redis keys, field names and values are byte strings; Postgres `text` and `jsonb` hold
//! UTF-8 without NUL. The rules (documented in the README):
//!
//! * **Names** (stream keys, field names): valid UTF-8 without NUL is stored as it is, except
//!   that a name starting with `$` gets one more `$` in front. Anything else is stored as
//!   `$b64:` followed by the standard base64 of the bytes. So a stored name starting with
//!   `$b64:` is always an encoded one, and `$$x` is always the name `$x`.
//! * **Values** in `data`: valid UTF-8 without NUL is a JSON string; anything else is the
//!   JSON object `{"$b64": "<base64>"}`. A plain value is never an object, so this cannot be
//!   mistaken for data.
//! * A field name that occurs more than once in one entry (Redis allows it) becomes one key
//!   whose value is a JSON array of the values in order.
//!
//! Everything here is pure and round-trip tested.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

pub const B64_NAME_PREFIX: &str = "$b64:";
pub const B64_VALUE_KEY: &str = "$b64";

pub(crate) fn plain(bytes: &[u8]) -> Option<&str> {
    if bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Encodes a stream key or field name as text.
pub fn encode_name(bytes: &[u8]) -> String {
    match plain(bytes) {
        Some(s) if s.starts_with('$') => format!("${s}"),
        Some(s) => s.to_owned(),
        None => format!("{B64_NAME_PREFIX}{}", STANDARD.encode(bytes)),
    }
}

/// A value for a text column of a route: valid UTF-8 without NUL as it is, anything else as
/// `$b64:` and the base64 of the bytes (a text column cannot hold them; a `bytea` column
/// gets the bytes themselves).
pub fn encode_value_text(bytes: &[u8]) -> String {
    match plain(bytes) {
        Some(s) => s.to_owned(),
        None => format!("{B64_NAME_PREFIX}{}", STANDARD.encode(bytes)),
    }
}

/// Inverse of [`encode_name`]; `None` for text that no name encodes to.
pub fn decode_name(text: &str) -> Option<Vec<u8>> {
    if let Some(b64) = text.strip_prefix(B64_NAME_PREFIX) {
        STANDARD.decode(b64).ok()
    } else if let Some(rest) = text.strip_prefix("$$") {
        Some(format!("${rest}").into_bytes())
    } else if text.starts_with('$') {
        None
    } else {
        Some(text.as_bytes().to_vec())
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn push_json_value(out: &mut String, bytes: &[u8]) {
    match plain(bytes) {
        Some(s) => push_json_str(out, s),
        None => {
            out.push_str("{\"");
            out.push_str(B64_VALUE_KEY);
            out.push_str("\":\"");
            out.push_str(&STANDARD.encode(bytes));
            out.push_str("\"}");
        }
    }
}

/// The `data` JSON object of one stream entry, as text ready for a `::jsonb` cast. Linear
/// in the number of fields (a hash of half a million fields takes a moment, not minutes).
pub fn entry_json<N: AsRef<[u8]>, V: AsRef<[u8]>>(fields: &[(N, V)]) -> String {
    let mut out = String::with_capacity(
        2 + fields.iter().map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 6).sum::<usize>(),
    );
    // Names each given once (the common case): written as they come, nothing gathered.
    if fields.len() <= 16
        && fields
            .iter()
            .enumerate()
            .all(|(i, (n, _))| fields[..i].iter().all(|(m, _)| m.as_ref() != n.as_ref()))
    {
        out.push('{');
        for (i, (name, value)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_name(&mut out, name.as_ref());
            out.push(':');
            push_json_value(&mut out, value.as_ref());
        }
        out.push('}');
        return out;
    }
    // The values of each name, in order, under the name's first occurrence.
    let mut groups: Vec<(&[u8], Vec<&[u8]>)> = Vec::new();
    if fields.len() <= 16 {
        for (name, value) in fields {
            let (name, value) = (name.as_ref(), value.as_ref());
            match groups.iter_mut().find(|(n, _)| *n == name) {
                Some((_, values)) => values.push(value),
                None => groups.push((name, vec![value])),
            }
        }
    } else {
        let mut at: std::collections::HashMap<&[u8], usize> =
            std::collections::HashMap::with_capacity(fields.len());
        for (name, value) in fields {
            let (name, value) = (name.as_ref(), value.as_ref());
            match at.get(name) {
                Some(&g) => groups[g].1.push(value),
                None => {
                    at.insert(name, groups.len());
                    groups.push((name, vec![value]));
                }
            }
        }
    }
    out.push('{');
    for (g, (name, values)) in groups.iter().enumerate() {
        if g > 0 {
            out.push(',');
        }
        push_json_name(&mut out, name);
        out.push(':');
        if let [value] = values.as_slice() {
            push_json_value(&mut out, value);
        } else {
            out.push('[');
            for (k, v) in values.iter().enumerate() {
                if k > 0 {
                    out.push(',');
                }
                push_json_value(&mut out, v);
            }
            out.push(']');
        }
    }
    out.push('}');
    out
}

/// A field name as a JSON string, encoded as [`encode_name`] does (without a copy when it
/// is plain text).
fn push_json_name(out: &mut String, name: &[u8]) {
    match plain(name) {
        Some(s) if !s.starts_with('$') => push_json_str(out, s),
        _ => push_json_str(out, &encode_name(name)),
    }
}

/// Inverse of [`entry_json`]: the (name, value) pairs of a stored `data` object, a name
/// that held several values once per value; `None` for text that no entry encodes to.
pub fn decode_entry_json(json: &str) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let value = |v: &serde_json::Value| -> Option<Vec<u8>> {
        match v {
            serde_json::Value::String(s) => Some(s.as_bytes().to_vec()),
            serde_json::Value::Object(o) => STANDARD.decode(o.get(B64_VALUE_KEY)?.as_str()?).ok(),
            _ => None,
        }
    };
    let mut out = Vec::new();
    for (k, v) in v.as_object()? {
        let name = decode_name(k)?;
        match v {
            serde_json::Value::Array(values) => {
                for v in values {
                    out.push((name.clone(), value(v)?));
                }
            }
            v => out.push((name, value(v)?)),
        }
    }
    Some(out)
}

/// Milliseconds of a stream entry ID (`<ms>-<seq>`).
pub fn entry_id_millis(id: &str) -> Option<i64> {
    let ms = id.split_once('-').map_or(id, |(ms, _)| ms);
    ms.parse::<u64>().ok().and_then(|v| i64::try_from(v).ok())
}

/// A Redis value as stored in the key-value table: `(redis_value, value_encoding)`.
///
/// * string: the text itself (`value_encoding` NULL), or, when not valid UTF-8 or holding
///   NUL, the standard base64 of the bytes with `value_encoding = 'base64'`;
/// * hash: a JSON object field -> value (names and values encoded as in stream `data`);
/// * list: a JSON array of the elements in order;
/// * set: a JSON array of the members, sorted bytewise (Redis returns them in no order);
/// * zset: a JSON array of `[member, score]` pairs in Redis' order (by score, then member),
///   the score a JSON number, or the string `"inf"`/`"-inf"`.
pub enum Value<'a> {
    String(&'a [u8]),
    Hash(&'a [(Vec<u8>, Vec<u8>)]),
    List(&'a [Vec<u8>]),
    Set(&'a [Vec<u8>]),
    ZSet(&'a [(Vec<u8>, Vec<u8>)]),
}

pub fn value_text(v: Value<'_>) -> (String, Option<&'static str>) {
    match v {
        Value::String(b) => match plain(b) {
            Some(s) => (s.to_owned(), None),
            None => (STANDARD.encode(b), Some("base64")),
        },
        Value::Hash(fields) => (entry_json(fields), None),
        Value::List(items) => (json_array(items.iter().map(Vec::as_slice)), None),
        Value::Set(members) => {
            let mut sorted: Vec<&[u8]> = members.iter().map(Vec::as_slice).collect();
            sorted.sort_unstable();
            (json_array(sorted.into_iter()), None)
        }
        Value::ZSet(pairs) => {
            let mut out = String::from("[");
            for (i, (member, score)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('[');
                push_json_value(&mut out, member);
                out.push(',');
                push_score(&mut out, score);
                out.push(']');
            }
            out.push(']');
            (out, None)
        }
    }
}

fn json_array<'a>(items: impl Iterator<Item = &'a [u8]>) -> String {
    let mut out = String::from("[");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_value(&mut out, item);
    }
    out.push(']');
    out
}

fn push_score(out: &mut String, score: &[u8]) {
    let text = std::str::from_utf8(score).unwrap_or("");
    match text.parse::<f64>() {
        // Shortest text that reads back as the same f64: a valid JSON number.
        Ok(f) if f.is_finite() => out.push_str(&f.to_string()),
        Ok(f) if f > 0.0 => out.push_str("\"inf\""),
        Ok(_) => out.push_str("\"-inf\""),
        Err(_) => push_json_str(out, text),
    }
}

/// Appends `s` as one field of COPY's text format (backslash, tab, newline, CR escaped).
pub fn push_copy_field(out: &mut Vec<u8>, s: &str) {
    let mut start = 0;
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
}

/// Milliseconds since the Unix epoch as a `timestamptz` literal in UTC
/// (`YYYY-MM-DD HH:MM:SS.mmm+00`), for COPY.
pub fn push_utc_millis(out: &mut Vec<u8>, millis: i64) {
    use std::io::Write;
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (hh, mi, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    if !(0..=9999).contains(&y) {
        let _ = write!(out, "{y:04}-{m:02}-{d:02} {hh:02}:{mi:02}:{ss:02}.{ms:03}+00");
        return;
    }
    // Written digit by digit: this runs for every row of a route with a `$timestamp`.
    let mut text = *b"0000-00-00 00:00:00.000+00";
    for (at, width, n) in
        [(0, 4, y), (5, 2, m), (8, 2, d), (11, 2, hh), (14, 2, mi), (17, 2, ss), (20, 3, ms)]
    {
        let mut n = n;
        for k in (at..at + width).rev() {
            text[k] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    out.extend_from_slice(&text);
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Decodes an `entry_json` text back into (name, value) pairs, sorted: the test oracle.
    pub fn decode_entry(json: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let v: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
        let mut out = Vec::new();
        let decode_value = |v: &serde_json::Value| -> Vec<u8> {
            match v {
                serde_json::Value::String(s) => s.as_bytes().to_vec(),
                serde_json::Value::Object(o) => {
                    STANDARD.decode(o[B64_VALUE_KEY].as_str().expect("b64 string")).expect("base64")
                }
                other => panic!("unexpected value {other}"),
            }
        };
        for (k, v) in v.as_object().expect("object") {
            let name = decode_name(k).expect("decodable name");
            match v {
                serde_json::Value::Array(items) => {
                    for item in items {
                        out.push((name.clone(), decode_value(item)));
                    }
                }
                other => out.push((name, decode_value(other))),
            }
        }
        out.sort();
        out
    }

    fn roundtrip(fields: Vec<(Vec<u8>, Vec<u8>)>) {
        let json = entry_json(&fields);
        let mut want = fields.clone();
        want.sort();
        assert_eq!(decode_entry(&json), want, "{json}");
    }

    #[test]
    fn names() {
        for n in [
            &b"plain"[..],
            b"$dollar",
            b"$$two",
            b"$b64:looks-encoded",
            b"",
            b"\xff\xfe",
            b"a\0b",
            "ünï".as_bytes(),
        ] {
            let e = encode_name(n);
            assert!(!e.contains('\0'));
            assert_eq!(decode_name(&e).as_deref(), Some(n), "{e}");
        }
        assert_eq!(encode_name(b"temp"), "temp");
        assert_eq!(encode_name(b"$x"), "$$x");
        assert_eq!(encode_name(b"\xff"), "$b64:/w==");
        assert_eq!(decode_name("$lonely"), None);
    }

    #[test]
    fn entries_roundtrip() {
        roundtrip(vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"two".to_vec())]);
        roundtrip(vec![(b"q\"uote".to_vec(), b"line\nbreak\t\\ \x01".to_vec())]);
        roundtrip(vec![(b"bin".to_vec(), vec![0, 159, 146, 150, 255])]);
        roundtrip(vec![(vec![0xc3, 0x28], b"bad utf8 name".to_vec())]);
        roundtrip(vec![(b"nul".to_vec(), b"a\0b".to_vec())]);
        roundtrip(vec![(b"$b64".to_vec(), b"collides?".to_vec())]);
        roundtrip(vec![
            (b"dup".to_vec(), b"1".to_vec()),
            (b"x".to_vec(), b"y".to_vec()),
            (b"dup".to_vec(), b"2".to_vec()),
        ]);
        roundtrip(vec![(b"big".to_vec(), vec![b'x'; 1 << 20])]);
        roundtrip(vec![]);
    }

    #[test]
    fn plain_entries_are_plain_json() {
        assert_eq!(
            entry_json(&[("heart_rate", "72"), ("spo2", "98")]),
            r#"{"heart_rate":"72","spo2":"98"}"#
        );
        assert_eq!(entry_json(&[("v", &b"\xff"[..])]), r#"{"v":{"$b64":"/w=="}}"#);
    }

    #[test]
    fn copy_fields_escape_the_format_characters() {
        let mut out = Vec::new();
        push_copy_field(&mut out, "a\tb\nc\rd\\e");
        assert_eq!(out, b"a\\tb\\nc\\rd\\\\e");
    }

    #[test]
    fn utc_millis() {
        let f = |ms| {
            let mut v = Vec::new();
            push_utc_millis(&mut v, ms);
            String::from_utf8(v).unwrap_or_default()
        };
        assert_eq!(f(0), "1970-01-01 00:00:00.000+00");
        assert_eq!(f(1_700_000_000_123), "2023-11-14 22:13:20.123+00");
        assert_eq!(f(951_782_400_000), "2000-02-29 00:00:00.000+00");
        assert_eq!(f(-1), "1969-12-31 23:59:59.999+00");
        assert_eq!(f(253_402_300_799_999), "9999-12-31 23:59:59.999+00");
        assert_eq!(f(253_402_300_800_000), "10000-01-01 00:00:00.000+00");
    }

    #[test]
    fn values_of_every_type() {
        let v = |x: Value<'_>| value_text(x);
        assert_eq!(v(Value::String(b"plain")), ("plain".into(), None));
        assert_eq!(v(Value::String(b"\xff\x00")), ("/wA=".into(), Some("base64")));
        let h = vec![(b"f".to_vec(), b"1".to_vec()), (b"g".to_vec(), b"\x00".to_vec())];
        assert_eq!(v(Value::Hash(&h)).0, r#"{"f":"1","g":{"$b64":"AA=="}}"#);
        let l = vec![b"b".to_vec(), b"a".to_vec(), b"b".to_vec()];
        assert_eq!(v(Value::List(&l)).0, r#"["b","a","b"]"#);
        let st = vec![b"b".to_vec(), b"c".to_vec(), b"a".to_vec()];
        assert_eq!(v(Value::Set(&st)).0, r#"["a","b","c"]"#);
        let z = vec![
            (b"low".to_vec(), b"-inf".to_vec()),
            (b"x".to_vec(), b"1.5".to_vec()),
            (b"y".to_vec(), b"2".to_vec()),
            (b"top".to_vec(), b"inf".to_vec()),
        ];
        assert_eq!(v(Value::ZSet(&z)).0, r#"[["low","-inf"],["x",1.5],["y",2],["top","inf"]]"#);
        let parsed: serde_json::Value = serde_json::from_str(&v(Value::ZSet(&z)).0).expect("json");
        assert!(parsed.is_array());
    }

    #[test]
    fn ids() {
        assert_eq!(entry_id_millis("1700000000123-7"), Some(1_700_000_000_123));
        assert_eq!(entry_id_millis("5"), Some(5));
        assert_eq!(entry_id_millis("x-1"), None);
    }
}

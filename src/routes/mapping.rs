//! What a route maps, and the rows it makes: pure, so the reader threads build a route's
//! rows (as they build the stream table's) and the tests need neither Postgres nor Redis.
//!
//! A route's `columns` maps each target column to a source: a field of the entry or hash,
//! by name, or one of the meta values (`$id`, `$stream`, `$timestamp`, `$fields` for
//! streams; `$key`, `$key_part N`, `$value`, `$expires_at`, `$fields` for keys). A field
//! named with a leading `$` is written with one more (`$$price` is the field `$price`), as
//! stored names are. Every value is text given to the column type's own input function
//! (COPY, or a cast from text), so whatever the type accepts in text form works.

use crate::encode::{decode_name, entry_json, push_copy_field, push_utc_millis};
use crate::parse::Pattern;

/// Streams or keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Stream,
    Key,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Stream => "stream",
            Kind::Key => "key",
        }
    }
}

/// Where a target column's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A field of the entry (or of the hash, or of the JSON object a string key holds), by
    /// its name in bytes. Absent: NULL.
    Field(Vec<u8>),
    /// The entry ID.
    Id,
    /// The stream, as the stream table stores its name (`db{N}:` outside `redis_db`).
    Stream,
    /// The time in the entry ID.
    Timestamp,
    /// Every field, as the stream table's `data` object (jsonb).
    Fields,
    /// The key's name.
    Key,
    /// What the N-th `*` or `?` of the matching pattern matched (1-based).
    KeyPart(usize),
    /// A string key's value.
    Value,
    /// The key's expiry (NULL without one).
    ExpiresAt,
}

impl Source {
    /// Parses a source as written in `columns`.
    pub fn parse(text: &str, kind: Kind) -> Result<Source, String> {
        let meta = match text {
            "$id" => Some((Source::Id, Kind::Stream)),
            "$stream" => Some((Source::Stream, Kind::Stream)),
            "$timestamp" => Some((Source::Timestamp, Kind::Stream)),
            "$key" => Some((Source::Key, Kind::Key)),
            "$value" => Some((Source::Value, Kind::Key)),
            "$expires_at" => Some((Source::ExpiresAt, Kind::Key)),
            _ => None,
        };
        if let Some((source, only)) = meta {
            if only != kind {
                return Err(format!("{text} belongs to {} routes", only.as_str()));
            }
            return Ok(source);
        }
        if text == "$fields" {
            return Ok(Source::Fields);
        }
        if let Some(n) = text.strip_prefix("$key_part") {
            if kind != Kind::Key {
                return Err("$key_part belongs to key routes".into());
            }
            return match n.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Source::KeyPart(n)),
                _ => Err(format!(
                    "\"{text}\": $key_part takes the number of a wildcard of the pattern, from 1 (\"$key_part 1\")"
                )),
            };
        }
        if text.is_empty() {
            return Err("an empty field name".into());
        }
        match decode_name(text) {
            Some(name) => Ok(Source::Field(name)),
            None => Err(format!(
                "\"{text}\" is no meta value ($id, $stream, $timestamp, $fields, $key, $key_part N, $value, $expires_at); a field whose name starts with $ is written with one more $"
            )),
        }
    }
}

/// How a value is written for a column of this kind of type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    /// Any type but bytea: the value's text (non-UTF-8 bytes as `$b64:` and base64).
    Text,
    /// bytea: the exact bytes, in hex input form.
    Bytea,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub source: Source,
    pub ty: ColumnType,
}

/// What the reader thread needs to build a route's rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowMap {
    pub route: String,
    pub columns: Vec<Column>,
}

/// One stream entry, as the reader has it.
pub struct Entry<'a> {
    pub id: &'a str,
    /// The stream's stored name.
    pub stream: &'a str,
    pub millis: i64,
    pub fields: &'a crate::redis::Fields,
}

/// A key, as the key-value worker has it: its name, the parts its pattern matched, its
/// fields (a hash, or a string holding a JSON object) or its value, its expiry.
pub struct KeyRow<'a> {
    pub key: &'a [u8],
    pub parts: &'a [&'a [u8]],
    pub fields: &'a [(&'a [u8], &'a [u8])],
    pub value: Option<&'a [u8]>,
    pub expires_millis: Option<i64>,
}

/// A value of one column: `None` is NULL.
pub type Cell = Option<String>;

fn bytes_cell(b: &[u8], ty: ColumnType) -> String {
    match ty {
        ColumnType::Bytea => {
            let mut out = String::with_capacity(2 + b.len() * 2);
            out.push_str("\\x");
            for byte in b {
                out.push_str(&format!("{byte:02x}"));
            }
            out
        }
        ColumnType::Text => crate::encode::encode_value_text(b),
    }
}

fn millis_cell(millis: i64) -> String {
    let mut out = Vec::new();
    push_utc_millis(&mut out, millis);
    String::from_utf8(out).unwrap_or_default()
}

/// The first value of field `name` (Redis allows a name twice in one entry; the first
/// counts, as for a hash field).
fn field<'f>(fields: &[(&[u8], &'f [u8])], name: &[u8]) -> Option<&'f [u8]> {
    fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

impl RowMap {
    /// The cells of a stream entry's row, in column order.
    pub fn entry_cells(&self, e: &Entry<'_>) -> Vec<Cell> {
        self.columns
            .iter()
            .map(|c| match &c.source {
                Source::Field(name) => e.fields.get(name).map(|v| bytes_cell(v, c.ty)),
                Source::Id => Some(e.id.to_owned()),
                Source::Stream => Some(e.stream.to_owned()),
                Source::Timestamp => Some(millis_cell(e.millis)),
                Source::Fields => Some(entry_json(&e.fields.pairs())),
                Source::Key | Source::KeyPart(_) | Source::Value | Source::ExpiresAt => None,
            })
            .collect()
    }

    /// Appends a stream entry's row of COPY text: the same text as [`push_copy_cells`] of
    /// [`RowMap::entry_cells`], written straight (no cell is made for the common columns).
    pub fn push_entry_copy(&self, out: &mut Vec<u8>, e: &Entry<'_>) {
        for (i, c) in self.columns.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            match &c.source {
                Source::Field(name) => match e.fields.get(name) {
                    None => out.extend_from_slice(b"\\N"),
                    Some(v) => match (c.ty, crate::encode::plain(v)) {
                        (ColumnType::Text, Some(text)) => push_copy_field(out, text),
                        _ => push_copy_field(out, &bytes_cell(v, c.ty)),
                    },
                },
                Source::Id => push_copy_field(out, e.id),
                Source::Stream => push_copy_field(out, e.stream),
                // (Digits, dashes, colons, a dot and a plus: nothing to escape.)
                Source::Timestamp => push_utc_millis(out, e.millis),
                Source::Fields => push_copy_field(out, &entry_json(&e.fields.pairs())),
                Source::Key | Source::KeyPart(_) | Source::Value | Source::ExpiresAt => {
                    out.extend_from_slice(b"\\N")
                }
            }
        }
        out.push(b'\n');
    }

    /// The cells of a key's row, in column order.
    pub fn key_cells(&self, k: &KeyRow<'_>) -> Vec<Cell> {
        self.columns
            .iter()
            .map(|c| match &c.source {
                Source::Field(name) => field(k.fields, name).map(|v| bytes_cell(v, c.ty)),
                Source::Key => Some(bytes_cell(k.key, c.ty)),
                Source::KeyPart(n) => k.parts.get(n - 1).map(|p| bytes_cell(p, c.ty)),
                Source::Value => k.value.map(|v| bytes_cell(v, c.ty)),
                Source::ExpiresAt => k.expires_millis.map(millis_cell),
                Source::Fields => Some(entry_json(k.fields)),
                Source::Id | Source::Stream | Source::Timestamp => None,
            })
            .collect()
    }
}

/// Appends one row of COPY text (NULL as `\N`): what [`RowMap::push_entry_copy`] writes
/// straight.
pub fn push_copy_cells(out: &mut Vec<u8>, cells: &[Cell]) {
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match cell {
            Some(v) => push_copy_field(out, v),
            None => out.extend_from_slice(b"\\N"),
        }
    }
    out.push(b'\n');
}

/// Which route, of several, a name goes to: the one whose matching pattern is the most
/// specific (most characters that are not wildcards); between equally specific ones, the
/// first by name. Returns the index into `routes` and the parts its pattern matched.
pub fn choose<'r, 'n>(
    routes: impl Iterator<Item = (usize, &'r str, &'r [Pattern])>,
    name: &'n [u8],
) -> Option<(usize, Vec<&'n [u8]>)> {
    let mut best: Option<(usize, &str, usize, Vec<&[u8]>)> = None;
    for (i, route, patterns) in routes {
        for p in patterns {
            let Some(parts) = p.captures(name) else { continue };
            let spec = p.specificity();
            let better = match &best {
                None => true,
                Some((_, r, s, _)) => spec > *s || (spec == *s && route < *r),
            };
            if better {
                best = Some((i, route, spec, parts));
            }
        }
    }
    best.map(|(i, _, _, parts)| (i, parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(cols: &[(&str, &str)], kind: Kind) -> RowMap {
        RowMap {
            route: "r".into(),
            columns: cols
                .iter()
                .map(|(n, s)| Column {
                    name: n.to_string(),
                    source: Source::parse(s, kind).expect("source"),
                    ty: if *n == "raw" { ColumnType::Bytea } else { ColumnType::Text },
                })
                .collect(),
        }
    }

    #[test]
    fn sources_parse_by_kind() {
        assert_eq!(Source::parse("$id", Kind::Stream), Ok(Source::Id));
        assert_eq!(Source::parse("$key_part 2", Kind::Key), Ok(Source::KeyPart(2)));
        assert_eq!(Source::parse("$key_part2", Kind::Key), Ok(Source::KeyPart(2)));
        assert_eq!(Source::parse("hr", Kind::Stream), Ok(Source::Field(b"hr".to_vec())));
        assert_eq!(Source::parse("$$price", Kind::Key), Ok(Source::Field(b"$price".to_vec())));
        assert_eq!(Source::parse("$fields", Kind::Key), Ok(Source::Fields));
        assert!(Source::parse("$key", Kind::Stream).is_err());
        assert!(Source::parse("$id", Kind::Key).is_err());
        assert!(Source::parse("$key_part 0", Kind::Key).is_err());
        assert!(Source::parse("$nope", Kind::Stream).is_err());
        assert!(Source::parse("", Kind::Stream).is_err());
    }

    #[test]
    fn an_entry_becomes_cells_and_copy_text() {
        let m = map(
            &[
                ("device", "$stream"),
                ("hr", "hr"),
                ("at", "$timestamp"),
                ("id", "$id"),
                ("spo2", "spo2"),
                ("all", "$fields"),
                ("raw", "blob"),
            ],
            Kind::Stream,
        );
        let fields = crate::redis::Fields::from_pairs(&[
            (b"hr".to_vec(), b"72".to_vec()),
            (b"blob".to_vec(), vec![0u8, 0xff]),
            (b"note".to_vec(), b"a\tb".to_vec()),
        ]);
        let e = Entry {
            id: "1700000000000-0",
            stream: "biosignal-1",
            millis: 1_700_000_000_000,
            fields: &fields,
        };
        let cells = m.entry_cells(&e);
        assert_eq!(cells[0].as_deref(), Some("biosignal-1"));
        assert_eq!(cells[1].as_deref(), Some("72"));
        assert_eq!(cells[2].as_deref(), Some("2023-11-14 22:13:20.000+00"));
        assert_eq!(cells[3].as_deref(), Some("1700000000000-0"));
        assert_eq!(cells[4], None, "an absent field is NULL");
        assert!(cells[5].as_deref().is_some_and(|j| j.contains("\"note\":\"a\\tb\"")));
        assert_eq!(cells[6].as_deref(), Some("\\x00ff"));
        let mut copy = Vec::new();
        push_copy_cells(&mut copy, &cells);
        let text = String::from_utf8(copy).expect("utf8");
        assert!(text
            .starts_with("biosignal-1\t72\t2023-11-14 22:13:20.000+00\t1700000000000-0\t\\N\t{"));
        assert!(text.ends_with("\t\\\\x00ff\n"), "{text}");
        let mut direct = Vec::new();
        m.push_entry_copy(&mut direct, &e);
        assert_eq!(String::from_utf8(direct).expect("utf8"), text, "written straight, the same");
    }

    #[test]
    fn a_key_becomes_cells() {
        let m = map(
            &[
                ("id", "$key_part 1"),
                ("name", "name"),
                ("k", "$key"),
                ("exp", "$expires_at"),
                ("v", "$value"),
            ],
            Kind::Key,
        );
        let fields: Vec<(&[u8], &[u8])> = vec![(b"name", b"Ada")];
        let parts: Vec<&[u8]> = vec![b"7"];
        let k = KeyRow {
            key: b"user:7",
            parts: &parts,
            fields: &fields,
            value: None,
            expires_millis: Some(0),
        };
        let cells = m.key_cells(&k);
        assert_eq!(
            cells,
            vec![
                Some("7".into()),
                Some("Ada".into()),
                Some("user:7".into()),
                Some("1970-01-01 00:00:00.000+00".into()),
                None,
            ]
        );
        // Bytes that are not UTF-8 keep their lossless form in text columns.
        let bin: Vec<(&[u8], &[u8])> = vec![(b"name", &[0xffu8])];
        let k = KeyRow {
            key: b"user:8",
            parts: &parts,
            fields: &bin,
            value: None,
            expires_millis: None,
        };
        assert_eq!(m.key_cells(&k)[1].as_deref(), Some("$b64:/w=="));
    }

    #[test]
    fn the_most_specific_pattern_wins_then_the_first_name() {
        let all = vec![Pattern::new("*")];
        let users = vec![Pattern::new("user:*")];
        let other = vec![Pattern::new("*:*")];
        let routes = [("a_all", &all), ("b_users", &users), ("c_other", &other)];
        let pick = |name: &str| {
            choose(
                routes.iter().enumerate().map(|(i, (r, p))| (i, *r, p.as_slice())),
                name.as_bytes(),
            )
            .map(|(i, parts)| (routes[i].0, parts.len()))
        };
        assert_eq!(pick("user:7"), Some(("b_users", 1)));
        assert_eq!(pick("order:7"), Some(("c_other", 2)));
        assert_eq!(pick("plain"), Some(("a_all", 1)));
        let same = vec![Pattern::new("user:*")];
        let routes2 = [("z", &users), ("y", &same)];
        let got =
            choose(routes2.iter().enumerate().map(|(i, (r, p))| (i, *r, p.as_slice())), b"user:1");
        assert_eq!(got.map(|(i, _)| routes2[i].0), Some("y"));
    }
}

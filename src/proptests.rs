//! Property tests (proptest) over everything that turns outside bytes into text or settings
//! into values: names and values of any bytes round-trip through the encoding, entry JSON is
//! always valid JSON that gives the bytes back, the COPY escaping is reversible, and the
//! setting parsers never panic. `make test` runs them with PROPTEST_CASES=2000.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;

use crate::encode::{
    decode_name, encode_name, entry_json, push_copy_field, value_text, Value, B64_VALUE_KEY,
};
use crate::parse::{check_identifier, format_db_range, parse_db_range, parse_list, Pattern};

/// Names from a few (`$`-led among them), so that an entry often has a name twice.
fn small_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(b"a".to_vec()), Just(b"b".to_vec()), Just(b"$c".to_vec()), Just(vec![0xff])]
}

/// The bytes a JSON value of entry data stands for.
fn value_bytes(v: &serde_json::Value) -> Option<Vec<u8>> {
    match v {
        serde_json::Value::String(s) => Some(s.clone().into_bytes()),
        serde_json::Value::Object(o) => STANDARD.decode(o.get(B64_VALUE_KEY)?.as_str()?).ok(),
        _ => None,
    }
}

/// Undoes COPY text escaping.
fn unescape_copy(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut it = field.iter();
    while let Some(&b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(&c) => out.push(c),
            None => {}
        }
    }
    out
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    // Mostly short, some with '$', NUL, controls, high bytes, or valid multibyte UTF-8.
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "\\PC{0,40}".prop_map(String::into_bytes),
        "[$\\\\\"\\n\\t\\x00a-z]{0,20}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #[test]
    fn names_round_trip(name in bytes()) {
        let text = encode_name(&name);
        prop_assert_eq!(decode_name(&text), Some(name));
    }

    #[test]
    fn distinct_names_stay_distinct(a in bytes(), b in bytes()) {
        prop_assume!(a != b);
        prop_assert_ne!(encode_name(&a), encode_name(&b));
    }

    #[test]
    fn packed_fields_give_the_same_entry_json(
        fields in proptest::collection::vec((small_name(), bytes()), 0..8)
    ) {
        let packed = crate::redis::Fields::from_pairs(&fields);
        let back: Vec<(Vec<u8>, Vec<u8>)> =
            packed.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        prop_assert_eq!(&back, &fields);
        prop_assert_eq!(entry_json(&packed.pairs()), entry_json(&fields));
        let first = fields.iter().find(|(n, _)| n == b"a").map(|(_, v)| v.as_slice());
        prop_assert_eq!(packed.get(b"a"), first);
    }

    #[test]
    fn a_route_row_written_straight_is_the_copy_text_of_its_cells(
        fields in proptest::collection::vec((small_name(), bytes()), 0..8),
        sources in proptest::collection::vec(
            prop_oneof![
                Just("a"), Just("b"), Just("$id"), Just("$stream"), Just("$timestamp"),
                Just("$fields"),
            ],
            1..7,
        ),
        bytea in any::<bool>(),
        stream in "\\PC{0,12}",
        millis in any::<i64>().prop_map(|m| m % 4_000_000_000_000),
    ) {
        use crate::routes::mapping::{push_copy_cells, Column, ColumnType, Entry, Kind, RowMap, Source};
        let mut columns: Vec<Column> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| Column {
                name: format!("c{i}"),
                source: Source::parse(s, Kind::Stream).unwrap_or(Source::Id),
                ty: ColumnType::Text,
            })
            .collect();
        if bytea {
            columns.push(Column {
                name: "raw".into(),
                source: Source::Field(b"b".to_vec()),
                ty: ColumnType::Bytea,
            });
        }
        let map = RowMap { route: "r".into(), columns };
        let packed = crate::redis::Fields::from_pairs(&fields);
        let id = format!("{}-0", millis.max(0));
        let e = Entry { id: &id, stream: &stream, millis, fields: &packed };
        let mut by_cells = Vec::new();
        push_copy_cells(&mut by_cells, &map.entry_cells(&e));
        let mut straight = Vec::new();
        map.push_entry_copy(&mut straight, &e);
        prop_assert_eq!(straight, by_cells);
    }

    #[test]
    fn entry_json_is_valid_and_gives_the_bytes_back(
        fields in proptest::collection::vec((prop_oneof![bytes(), small_name()], bytes()), 0..8)
    ) {
        let json = entry_json(&fields);
        let parsed: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| TestCaseError::fail(format!("{e}: {json}")))?;
        let obj = parsed.as_object().ok_or_else(|| TestCaseError::fail("not an object"))?;
        for (name, value) in &fields {
            let got = obj.get(&encode_name(name)).ok_or_else(|| TestCaseError::fail("field missing"))?;
            let values: Vec<Vec<u8>> = fields.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect();
            if values.len() == 1 {
                prop_assert_eq!(value_bytes(got), Some(value.clone()));
            } else {
                let arr = got.as_array().ok_or_else(|| TestCaseError::fail("repeats are an array"))?;
                let decoded: Vec<Option<Vec<u8>>> = arr.iter().map(value_bytes).collect();
                prop_assert_eq!(decoded, values.into_iter().map(Some).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn string_values_round_trip(value in bytes()) {
        let (text, encoding) = value_text(Value::String(&value));
        let back = match encoding {
            None => text.into_bytes(),
            Some("base64") => STANDARD.decode(&text).map_err(|e| TestCaseError::fail(e.to_string()))?,
            Some(other) => return Err(TestCaseError::fail(format!("encoding {other}"))),
        };
        prop_assert_eq!(back, value);
    }

    #[test]
    fn copy_escaping_round_trips(text in "\\PC{0,40}|[\\\\\\n\\r\\t\\x08\\x0b\\x0c.]{0,20}") {
        let mut out = Vec::new();
        push_copy_field(&mut out, &text);
        prop_assert!(!out.contains(&b'\n') && !out.contains(&b'\t') && !out.contains(&b'\r'));
        prop_assert_eq!(unescape_copy(&out), text.into_bytes());
    }

    #[test]
    fn setting_parsers_never_panic(input in "\\PC{0,30}|[0-9,\\- ]{0,20}") {
        if let Ok(dbs) = parse_db_range(&input) {
            prop_assert!(dbs.iter().all(|d| *d <= crate::parse::MAX_REDIS_DB));
            prop_assert_eq!(parse_db_range(&format_db_range(&dbs)), Ok(dbs));
        }
        let _ = parse_list(&input);
        if check_identifier(&input).is_ok() {
            prop_assert!(input.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()));
        }
        let p = Pattern::new(&input);
        let _ = p.matches(input.as_bytes());
        let _ = p.to_redis_glob();
    }

    #[test]
    fn patterns_without_wildcards_match_only_themselves(a in "[a-z0-9:._-]{0,12}", b in "[a-z0-9:._-]{0,12}") {
        prop_assert!(Pattern::new(&a).matches(a.as_bytes()));
        prop_assert_eq!(Pattern::new(&a).matches(b.as_bytes()), a == b);
    }
}

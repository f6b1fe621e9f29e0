//! Pure parsers for setting values: database ranges, comma lists, fnmatch patterns and
//! SQL identifiers. Nothing here calls Postgres, so all of it is unit-tested with `#[test]`.

/// Highest Redis logical database number accepted (Redis' default `databases 16`).
pub const MAX_REDIS_DB: u8 = 15;

/// `[0, 1, 2, 3, 5]` -> `0-3,5`: the short form of a set of databases, for the log.
pub fn format_db_range(dbs: &[u8]) -> String {
    let mut sorted = dbs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

/// Parses a database search range such as `0-15` or `0,2,5-7` into a sorted, de-duplicated
/// list. The error text is the "accepted form" shown to the DBA in the GUC error's DETAIL.
pub fn parse_db_range(input: &str) -> Result<Vec<u8>, String> {
    let mut dbs = Vec::new();
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(range_form("the value is empty"));
    }
    for part in trimmed.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(range_form("an item between commas is empty"));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (parse_db(a.trim())?, parse_db(b.trim())?),
            None => {
                let n = parse_db(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(range_form(&format!("the range \"{part}\" runs backwards")));
        }
        dbs.extend(lo..=hi);
    }
    dbs.sort_unstable();
    dbs.dedup();
    Ok(dbs)
}

fn parse_db(s: &str) -> Result<u8, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(range_form(&format!("\"{s}\" is not a database number")));
    }
    match s.parse::<u32>() {
        Ok(n) if n <= MAX_REDIS_DB as u32 => Ok(n as u8),
        _ => Err(range_form(&format!("database {s} is outside 0-{MAX_REDIS_DB}"))),
    }
}

fn range_form(what: &str) -> String {
    format!(
        "{what}. Accepted form: comma-separated database numbers or ranges between 0 and {MAX_REDIS_DB}, e.g. \"0-15\" or \"0,2,5-7\"."
    )
}

/// Splits a comma-separated list, trimming blanks and dropping empty items.
pub fn parse_list(input: &str) -> Vec<String> {
    input.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Checks a schema or table name: a letter or underscore, then letters, digits or
/// underscores, at most 63 bytes. Such names are still always quoted when used in SQL.
pub fn check_identifier(input: &str) -> Result<(), String> {
    let form = "Accepted form: a plain identifier (a letter or underscore, then letters, digits or underscores, at most 63 bytes).";
    let bytes = input.as_bytes();
    if bytes.is_empty() {
        return Err(format!("The name is empty. {form}"));
    }
    if bytes.len() > 63 {
        return Err(format!("The name is {} bytes long. {form}", bytes.len()));
    }
    let first_ok = bytes[0].is_ascii_alphabetic() || bytes[0] == b'_';
    let rest_ok = bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_');
    if !first_ok || !rest_ok {
        return Err(form.to_owned());
    }
    Ok(())
}

/// Quotes an identifier for SQL (double quotes, embedded quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The Redis globs to `SCAN ... MATCH` for `patterns`: one per pattern, or just `*` when a
/// pattern is `*` (it makes the others redundant).
pub fn redis_globs(patterns: &[Pattern]) -> Vec<Vec<u8>> {
    if patterns.iter().any(|p| p.as_str() == "*") {
        vec![b"*".to_vec()]
    } else {
        patterns.iter().map(Pattern::to_redis_glob).collect()
    }
}

/// A glob pattern with the meaning of Python's `fnmatch`: `*`, `?`, `[seq]`, `[!seq]`.
/// Backslash has no special meaning (as in fnmatch); an unclosed `[` is a literal `[`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    tokens: Vec<Token>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(u8),
    Any,
    One,
    Class { negated: bool, items: Vec<(u8, u8)> },
}

impl Pattern {
    pub fn new(source: &str) -> Pattern {
        let b = source.as_bytes();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'*' => {
                    if tokens.last() != Some(&Token::Any) {
                        tokens.push(Token::Any);
                    }
                    i += 1;
                }
                b'?' => {
                    tokens.push(Token::One);
                    i += 1;
                }
                b'[' => match parse_class(b, i) {
                    Some((tok, next)) => {
                        tokens.push(tok);
                        i = next;
                    }
                    None => {
                        tokens.push(Token::Literal(b'['));
                        i += 1;
                    }
                },
                c => {
                    tokens.push(Token::Literal(c));
                    i += 1;
                }
            }
        }
        Pattern { source: source.to_owned(), tokens }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Does the whole of `name` match?
    pub fn matches(&self, name: &[u8]) -> bool {
        // Iterative glob matching with one backtrack point per `*` (linear in practice).
        let (mut t, mut n) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            if t < self.tokens.len() {
                match &self.tokens[t] {
                    Token::Any => {
                        star = Some((t, n));
                        t += 1;
                        continue;
                    }
                    Token::One => {
                        t += 1;
                        n += 1;
                        continue;
                    }
                    Token::Literal(c) if *c == name[n] => {
                        t += 1;
                        n += 1;
                        continue;
                    }
                    Token::Class { negated, items } => {
                        let inside = items.iter().any(|(lo, hi)| *lo <= name[n] && name[n] <= *hi);
                        if inside != *negated {
                            t += 1;
                            n += 1;
                            continue;
                        }
                    }
                    Token::Literal(_) => {}
                }
            }
            match star {
                Some((st, sn)) => {
                    t = st + 1;
                    n = sn + 1;
                    star = Some((st, sn + 1));
                }
                None => return false,
            }
        }
        self.tokens[t..].iter().all(|tok| *tok == Token::Any)
    }

    /// What each `*` and `?` of the pattern matched in `name`, in order, when the whole of
    /// `name` matches; each `*` takes as little as it can, from the left (`user:*:*` on
    /// `user:7:profile:x` gives `7` and `profile:x`).
    pub fn captures<'n>(&self, name: &'n [u8]) -> Option<Vec<&'n [u8]>> {
        // The same walk as `matches`, noting where each token starts; the last `*` is the
        // only backtrack point, so earlier ones keep their shortest span.
        let mut start = vec![0usize; self.tokens.len() + 1];
        let (mut t, mut n) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            if t < self.tokens.len() {
                start[t] = n;
                match &self.tokens[t] {
                    Token::Any => {
                        star = Some((t, n));
                        t += 1;
                        continue;
                    }
                    Token::One => {
                        t += 1;
                        n += 1;
                        continue;
                    }
                    Token::Literal(c) if *c == name[n] => {
                        t += 1;
                        n += 1;
                        continue;
                    }
                    Token::Class { negated, items } => {
                        let inside = items.iter().any(|(lo, hi)| *lo <= name[n] && name[n] <= *hi);
                        if inside != *negated {
                            t += 1;
                            n += 1;
                            continue;
                        }
                    }
                    Token::Literal(_) => {}
                }
            }
            let (st, sn) = star?;
            t = st + 1;
            n = sn + 1;
            star = Some((st, sn + 1));
        }
        if !self.tokens[t..].iter().all(|tok| *tok == Token::Any) {
            return None;
        }
        for s in start.iter_mut().skip(t) {
            *s = name.len();
        }
        Some(
            self.tokens
                .iter()
                .enumerate()
                .filter(|(_, tok)| matches!(tok, Token::Any | Token::One))
                .map(|(i, _)| &name[start[i]..start[i + 1]])
                .collect(),
        )
    }

    /// How many `*` and `?` the pattern has (what `$key_part N` may name).
    pub fn wildcards(&self) -> usize {
        self.tokens.iter().filter(|t| matches!(t, Token::Any | Token::One)).count()
    }

    /// How specific the pattern is: its characters that are not wildcards (a route whose
    /// pattern is more specific wins over one that matches the same name with a looser one).
    pub fn specificity(&self) -> usize {
        self.tokens.iter().filter(|t| !matches!(t, Token::Any | Token::One)).count()
    }

    /// The name the pattern matches when each `*` and `?` is given `parts` in order; `None`
    /// when the pattern has classes, the parts are too few, or a `?` is given more or less
    /// than one byte.
    pub fn fill(&self, parts: &[&[u8]]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut k = 0;
        for tok in &self.tokens {
            match tok {
                Token::Literal(c) => out.push(*c),
                Token::Any => {
                    out.extend_from_slice(parts.get(k)?);
                    k += 1;
                }
                Token::One => {
                    let p = parts.get(k)?;
                    if p.len() != 1 {
                        return None;
                    }
                    out.extend_from_slice(p);
                    k += 1;
                }
                Token::Class { .. } => return None,
            }
        }
        (k == parts.len()).then_some(out)
    }

    /// The same pattern in Redis' glob syntax, for `SCAN ... MATCH`: Redis negates a class
    /// with `^` and treats `\\` as an escape, so both are translated. The server-side match
    /// only narrows what comes back; every key is confirmed with [`Pattern::matches`].
    pub fn to_redis_glob(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for tok in &self.tokens {
            match tok {
                Token::Any => out.push(b'*'),
                Token::One => out.push(b'?'),
                Token::Literal(c) => {
                    if matches!(c, b'*' | b'?' | b'[' | b']' | b'\\') {
                        out.push(b'\\');
                    }
                    out.push(*c);
                }
                Token::Class { negated, items } => {
                    out.push(b'[');
                    if *negated {
                        out.push(b'^');
                    }
                    for (lo, hi) in items {
                        push_class_byte(&mut out, *lo);
                        if lo != hi {
                            out.push(b'-');
                            push_class_byte(&mut out, *hi);
                        }
                    }
                    out.push(b']');
                }
            }
        }
        out
    }
}

fn push_class_byte(out: &mut Vec<u8>, c: u8) {
    if matches!(c, b']' | b'\\' | b'^' | b'-') {
        out.push(b'\\');
    }
    out.push(c);
}

/// Parses one class starting at `b[start] == '['`. Returns the token and the index after `]`.
fn parse_class(b: &[u8], start: usize) -> Option<(Token, usize)> {
    let mut i = start + 1;
    let negated = i < b.len() && b[i] == b'!';
    if negated {
        i += 1;
    }
    let mut items = Vec::new();
    let mut first = true;
    while i < b.len() {
        let c = b[i];
        if c == b']' && !first {
            return Some((Token::Class { negated, items }, i + 1));
        }
        first = false;
        if i + 2 < b.len() && b[i + 1] == b'-' && b[i + 2] != b']' {
            let (lo, hi) = (c, b[i + 2]);
            if lo <= hi {
                items.push((lo, hi));
            }
            i += 3;
        } else {
            items.push((c, c));
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_makes_other_globs_redundant() {
        let p = |v: &[&str]| v.iter().map(|s| Pattern::new(s)).collect::<Vec<_>>();
        assert_eq!(redis_globs(&p(&["a*", "*", "b"])), vec![b"*".to_vec()]);
        assert_eq!(redis_globs(&p(&["a*", "[!x]"])), vec![b"a*".to_vec(), b"[^x]".to_vec()]);
        assert!(redis_globs(&[]).is_empty());
    }

    #[test]
    fn db_range_accepts_ranges_and_lists() {
        assert_eq!(parse_db_range("0-15").ok(), Some((0..=15).collect()));
        assert_eq!(parse_db_range("0,2,5-7").ok(), Some(vec![0, 2, 5, 6, 7]));
        assert_eq!(parse_db_range(" 3 , 1-2 ,3").ok(), Some(vec![1, 2, 3]));
        assert_eq!(parse_db_range("7").ok(), Some(vec![7]));
        assert_eq!(parse_db_range("4-4").ok(), Some(vec![4]));
    }

    #[test]
    fn db_range_refuses_bad_input_with_the_accepted_form() {
        for bad in ["3-1", "0-99", "16", "", "  ", "a", "1,,2", "-1", "1-", "1-2-3", "0x1"] {
            let err = parse_db_range(bad).expect_err(bad);
            assert!(err.contains("Accepted form"), "{bad}: {err}");
        }
        assert!(parse_db_range("3-1").expect_err("3-1").contains("backwards"));
        assert!(parse_db_range("0-99").expect_err("0-99").contains("outside 0-15"));
    }

    #[test]
    fn list_trims_and_drops_blanks() {
        assert_eq!(parse_list(" a, b ,,c ,"), vec!["a", "b", "c"]);
        assert!(parse_list("  ").is_empty());
    }

    #[test]
    fn identifiers() {
        for ok in ["public", "_x", "redis_streams", "T1", &"a".repeat(63)] {
            assert!(check_identifier(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "a-b", "a b", "x;drop table y", "\"q\"", "é", &"a".repeat(64)] {
            assert!(check_identifier(bad).is_err(), "{bad}");
        }
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn fnmatch_semantics() {
        let m = |p: &str, s: &str| Pattern::new(p).matches(s.as_bytes());
        assert!(m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("*-stream", "device-stream"));
        assert!(!m("*-stream", "device-streams"));
        assert!(m("device:*:stream", "device:42:stream"));
        assert!(m("biosignal-?", "biosignal-1"));
        assert!(!m("biosignal-?", "biosignal-12"));
        assert!(m("s[0-9]", "s5"));
        assert!(!m("s[0-9]", "sx"));
        assert!(m("s[!0-9]", "sx"));
        assert!(!m("s[!0-9]", "s5"));
        assert!(m("s[abc]x", "sbx"));
        assert!(m("a[]]b", "a]b"));
        assert!(m("a[!]]b", "axb"));
        assert!(m("a[b", "a[b"), "unclosed [ is a literal");
        assert!(m("a\\b", "a\\b"), "backslash is a literal in fnmatch");
        assert!(m("*a*b*c*", "xxaxxbxxcxx"));
        assert!(!m("*a*b*c*", "xxaxxcxxbxx"));
        assert!(Pattern::new("x*").matches(b"x\xff\x00"));
    }

    #[test]
    fn captures_are_shortest_from_the_left() {
        let c = |p: &str, s: &str| {
            Pattern::new(p).captures(s.as_bytes()).map(|v| {
                v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>()
            })
        };
        assert_eq!(c("user:*:*", "user:7:profile:x"), Some(vec!["7".into(), "profile:x".into()]));
        assert_eq!(c("user:*", "user:42"), Some(vec!["42".into()]));
        assert_eq!(c("a?c*", "abcdef"), Some(vec!["b".into(), "def".into()]));
        assert_eq!(c("*-*", "a-b-c"), Some(vec!["a".into(), "b-c".into()]));
        assert_eq!(c("*x", "axbx"), Some(vec!["axb".into()]));
        assert_eq!(c("k*", "k"), Some(vec!["".into()]));
        assert_eq!(c("s[0-9]*", "s5tail"), Some(vec!["tail".into()]));
        assert_eq!(c("user:*", "order:1"), None);
        assert_eq!(Pattern::new("user:*:*").wildcards(), 2);
        assert!(Pattern::new("user:*").specificity() > Pattern::new("*").specificity());
        let p = Pattern::new("user:*:?");
        assert_eq!(p.fill(&[b"7", b"x"]), Some(b"user:7:x".to_vec()));
        assert_eq!(p.fill(&[b"7", b"xy"]), None);
        assert_eq!(p.fill(&[b"7"]), None);
        assert_eq!(Pattern::new("s[0-9]*").fill(&[b"x"]), None);
    }

    #[test]
    fn redis_glob_translation() {
        let g = |p: &str| String::from_utf8(Pattern::new(p).to_redis_glob()).unwrap_or_default();
        assert_eq!(g("*-stream"), "*-stream");
        assert_eq!(g("s[!0-9]?"), "s[^0-9]?");
        assert_eq!(g("a\\b"), "a\\\\b");
        assert_eq!(g("a[b"), "a\\[b");
        assert_eq!(g("x^y"), "x^y");
        assert_eq!(g("[!^]"), "[^\\^]");
        assert_eq!(g("é*"), "é*");
    }

    #[test]
    fn db_ranges_print_short() {
        assert_eq!(format_db_range(&[0, 1, 2, 3, 5]), "0-3,5");
        assert_eq!(format_db_range(&[7]), "7");
        assert_eq!(format_db_range(&[3, 1, 2, 2]), "1-3");
        assert_eq!(format_db_range(&[]), "");
        for text in ["0-15", "0,2,4", "1-3,7-9"] {
            let dbs = parse_db_range(text).expect("valid");
            assert_eq!(format_db_range(&dbs), text);
        }
    }
}

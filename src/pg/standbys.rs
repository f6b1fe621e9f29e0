//! How far the standbys have flushed the WAL, as `redis_sync.ack_after = standby` needs it:
//! as many standbys as `synchronous_standby_names` asks for (`FIRST n` or `ANY n`), or when
//! that is empty, every connected streaming standby. The rules here are pure; the figures
//! come from `pg_stat_replication`.

/// What `synchronous_standby_names` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quorum {
    /// `FIRST n (...)`, `n (...)` or a plain list (`FIRST 1`): the `n` standbys of highest
    /// priority, which `pg_stat_replication` shows as `sync`.
    First(usize),
    /// `ANY n (...)`: any `n` of the listed standbys, shown as `quorum`.
    Any(usize),
}

/// `None` for an empty setting. Keywords are case-insensitive; a standby named `first` or
/// `any` in a plain list is a name, not a keyword.
pub fn parse_quorum(names: &str) -> Option<Quorum> {
    let s = names.trim();
    if s.is_empty() {
        return None;
    }
    let (method, rest) = match s.split_once(char::is_whitespace) {
        Some((word, rest)) if word.eq_ignore_ascii_case("first") && starts_with_count(rest) => {
            ("first", rest.trim_start())
        }
        Some((word, rest)) if word.eq_ignore_ascii_case("any") && starts_with_count(rest) => {
            ("any", rest.trim_start())
        }
        _ => ("first", s),
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = rest[digits.len()..].trim_start();
    let n =
        if !digits.is_empty() && after.starts_with('(') { digits.parse().unwrap_or(1) } else { 1 };
    Some(if method == "any" { Quorum::Any(n) } else { Quorum::First(n) })
}

fn starts_with_count(rest: &str) -> bool {
    rest.trim_start().starts_with(|c: char| c.is_ascii_digit())
}

/// One row of `pg_stat_replication` in state `streaming`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standby {
    pub flushed: u64,
    /// `sync_state` is `sync` (chosen by priority).
    pub sync: bool,
    /// `sync_state` is `quorum`.
    pub quorum: bool,
}

/// How far the WAL is safe on the standbys that count: `None` when no standby counts (no
/// setting and none connected: acknowledgements wait for the local flush only), `Some(0)`
/// when fewer standbys than required are there (nothing is safe yet).
pub fn standbys_flushed(quorum: Option<Quorum>, standbys: &[Standby]) -> Option<u64> {
    match quorum {
        None => standbys.iter().map(|s| s.flushed).min(),
        Some(Quorum::First(n)) => {
            let chosen: Vec<u64> = standbys.iter().filter(|s| s.sync).map(|s| s.flushed).collect();
            if chosen.len() < n.max(1) {
                Some(0)
            } else {
                chosen.into_iter().min()
            }
        }
        Some(Quorum::Any(n)) => {
            let mut candidates: Vec<u64> =
                standbys.iter().filter(|s| s.quorum).map(|s| s.flushed).collect();
            candidates.sort_unstable_by(|a, b| b.cmp(a));
            Some(candidates.get(n.max(1) - 1).copied().unwrap_or(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_s_forms_are_read() {
        assert_eq!(parse_quorum(""), None);
        assert_eq!(parse_quorum("  "), None);
        assert_eq!(parse_quorum("s1"), Some(Quorum::First(1)));
        assert_eq!(parse_quorum("s1, s2"), Some(Quorum::First(1)));
        assert_eq!(parse_quorum("*"), Some(Quorum::First(1)));
        assert_eq!(parse_quorum("2 (s1, s2, s3)"), Some(Quorum::First(2)));
        assert_eq!(parse_quorum("FIRST 2 (s1, s2, s3)"), Some(Quorum::First(2)));
        assert_eq!(parse_quorum("first 3(s1,s2,s3)"), Some(Quorum::First(3)));
        assert_eq!(parse_quorum("ANY 2 (s1, s2, s3)"), Some(Quorum::Any(2)));
        assert_eq!(parse_quorum("any 1 (*)"), Some(Quorum::Any(1)));
        assert_eq!(parse_quorum("first, any"), Some(Quorum::First(1)));
        assert_eq!(parse_quorum("any"), Some(Quorum::First(1)));
    }

    fn standby(flushed: u64, state: &str) -> Standby {
        Standby { flushed, sync: state == "sync", quorum: state == "quorum" }
    }

    #[test]
    fn every_connected_standby_counts_without_a_setting() {
        assert_eq!(standbys_flushed(None, &[]), None);
        let list = [standby(300, "async"), standby(100, "async")];
        assert_eq!(standbys_flushed(None, &list), Some(100));
    }

    #[test]
    fn first_n_waits_for_the_chosen_standbys() {
        let list = [standby(300, "sync"), standby(200, "sync"), standby(50, "potential")];
        assert_eq!(standbys_flushed(Some(Quorum::First(2)), &list), Some(200));
        assert_eq!(standbys_flushed(Some(Quorum::First(3)), &list), Some(0));
        assert_eq!(standbys_flushed(Some(Quorum::First(1)), &[]), Some(0));
    }

    #[test]
    fn any_n_takes_the_n_th_furthest() {
        let list = [standby(300, "quorum"), standby(100, "quorum"), standby(200, "quorum")];
        assert_eq!(standbys_flushed(Some(Quorum::Any(1)), &list), Some(300));
        assert_eq!(standbys_flushed(Some(Quorum::Any(2)), &list), Some(200));
        assert_eq!(standbys_flushed(Some(Quorum::Any(3)), &list), Some(100));
        assert_eq!(standbys_flushed(Some(Quorum::Any(4)), &list), Some(0));
    }
}

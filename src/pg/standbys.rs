//! How far the standbys have flushed the WAL, as `redis_sync.ack_after = standby` needs it:
//! as many standbys as `synchronous_standby_names` asks for (`FIRST n` or `ANY n`), or when
//! that is empty, every connected streaming standby. The rules are pure
//! functions; [`flush_position`] reads the figures from `pg_stat_replication`.

use pgrx::prelude::*;

use crate::error::Result;

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

/// How far the WAL is safe on the standbys that count; 0 when fewer standbys than required
/// are there, or without a setting, none is connected (what that means is the caller's:
/// see `streams::acks`).
pub fn standbys_flushed(quorum: Option<Quorum>, standbys: &[Standby]) -> u64 {
    match quorum {
        None => standbys.iter().map(|s| s.flushed).min().unwrap_or(0),
        Some(Quorum::First(n)) => {
            let chosen: Vec<u64> = standbys.iter().filter(|s| s.sync).map(|s| s.flushed).collect();
            if chosen.len() < n.max(1) {
                0
            } else {
                chosen.into_iter().min().unwrap_or(0)
            }
        }
        Some(Quorum::Any(n)) => {
            let mut candidates: Vec<u64> =
                standbys.iter().filter(|s| s.quorum).map(|s| s.flushed).collect();
            candidates.sort_unstable_by(|a, b| b.cmp(a));
            candidates.get(n.max(1) - 1).copied().unwrap_or(0)
        }
    }
}

/// What the standbys hold now: how far the WAL is safe on those that count, how many
/// stream, and whether `synchronous_standby_names` names the ones that count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flushed {
    pub position: u64,
    pub connected: usize,
    pub named: bool,
}

/// The standbys: physical WAL senders (not connected to a database, as a logical one is)
/// that stream and report both a flush and a replay position (`pg_receivewal` and
/// `pg_basebackup` report no replay position, and are no standby to fail over to).
const STANDBYS: &str = "SELECT (r.flush_lsn - '0/0'::pg_lsn)::int8, r.sync_state \
     FROM pg_catalog.pg_stat_replication r JOIN pg_catalog.pg_stat_activity a USING (pid) \
     WHERE r.state = 'streaming' AND a.datid IS NULL \
       AND r.flush_lsn IS NOT NULL AND r.replay_lsn IS NOT NULL";

/// Reads `pg_stat_replication` (in a transaction of its own, as the bootstrap superuser, so
/// every standby's positions are visible) and applies `synchronous_standby_names`.
pub fn flush_position() -> Result<Flushed> {
    let quorum = parse_quorum(&super::txn::sync_standby_names());
    let standbys = super::in_transaction(|| {
        super::as_superuser(|| {
            Spi::connect(|client| {
                let rows = client.select(STANDBYS, None, &[]).map_err(super::spi_err)?;
                let mut out = Vec::new();
                for row in rows {
                    let flushed = row.get::<i64>(1).map_err(super::spi_err)?.unwrap_or(0);
                    let state = row.get::<String>(2).map_err(super::spi_err)?.unwrap_or_default();
                    out.push(Standby {
                        flushed: flushed.max(0) as u64,
                        sync: state == "sync",
                        quorum: state == "quorum",
                    });
                }
                Ok(out)
            })
        })
    })?;
    Ok(Flushed {
        position: standbys_flushed(quorum, &standbys),
        connected: standbys.len(),
        named: quorum.is_some(),
    })
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
        // None connected: nothing is known to be safe there.
        assert_eq!(standbys_flushed(None, &[]), 0);
        let list = [standby(300, "async"), standby(100, "async")];
        assert_eq!(standbys_flushed(None, &list), 100);
    }

    #[test]
    fn first_n_waits_for_the_chosen_standbys() {
        let list = [standby(300, "sync"), standby(200, "sync"), standby(50, "potential")];
        assert_eq!(standbys_flushed(Some(Quorum::First(2)), &list), 200);
        assert_eq!(standbys_flushed(Some(Quorum::First(3)), &list), 0);
        assert_eq!(standbys_flushed(Some(Quorum::First(1)), &[]), 0);
    }

    #[test]
    fn any_n_takes_the_n_th_furthest() {
        let list = [standby(300, "quorum"), standby(100, "quorum"), standby(200, "quorum")];
        assert_eq!(standbys_flushed(Some(Quorum::Any(1)), &list), 300);
        assert_eq!(standbys_flushed(Some(Quorum::Any(2)), &list), 200);
        assert_eq!(standbys_flushed(Some(Quorum::Any(3)), &list), 100);
        assert_eq!(standbys_flushed(Some(Quorum::Any(4)), &list), 0);
    }
}

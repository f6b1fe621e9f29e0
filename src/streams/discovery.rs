//! The discovery lane on the main thread: when discovery (or, in monitor mode, a health
//! check) is due, a job goes to the discovery thread; its report is reconciled with the
//! tracked streams here. Discovery runs every `stream_discovery_interval`, counted from the
//! end of the last one, and at once when `redis_sync_discover()` asks.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::discoverer::{Discovered, Discoverer, Found, GroupState, Job, Report};
use super::{stream_key_name, Cursor, StreamSync, Tracked};
use crate::error::{Result, SyncError};
use crate::gucs::{Mode, Settings};
use crate::pg::Waker;
use crate::redis::SharedBudget;
use crate::shmem::{self, StreamState};
use crate::worker::Log;

/// Stream keys a complete key-value pass saw, and when that pass started.
pub struct Learned {
    pub at: Instant,
    pub streams: Vec<(u8, Vec<u8>)>,
}

/// What the discovery lane needs from the main loop for one turn.
pub struct DiscoveryCtx<'a> {
    pub budget: &'a SharedBudget,
    pub waker: &'a Waker,
    /// The lane is not backing off: a job may be sent.
    pub may_send: bool,
    /// Redis is unreachable: send a discovery now, as the probe that finds it back.
    pub probe: bool,
    /// `redis_sync_discover()` calls counted so far (in shared memory).
    pub requested: u64,
    pub learned: Option<&'a Learned>,
}

/// What a turn of the discovery lane did.
#[derive(Debug, PartialEq)]
pub enum DiscoveryTurn {
    Nothing,
    /// The discovery thread (re)connected to Redis.
    Connected,
    /// A report came and was applied.
    Applied,
}

/// Does a key-value pass see every key discovery would look at? Then its stream keys can
/// stand in for a walk of discovery's own.
pub fn key_values_cover_discovery(s: &Settings) -> bool {
    s.key_value_auto_discovery
        && (s.key_value_patterns.iter().any(|p| p == "*")
            || s.stream_discovery_patterns.iter().all(|p| s.key_value_patterns.contains(p)))
}

type Found3 = (u8, Vec<u8>, bool);

/// What reconciling the tracked set with a discovery's findings changed.
#[derive(Debug, Default, PartialEq)]
struct Reconciled {
    /// Names (as stored) of the streams tracked from now on.
    added: Vec<String>,
    removed: usize,
}

impl StreamSync {
    /// Takes the discovery thread's report if one came and applies it; sends the next job
    /// when one is due (or asked for) and allowed. An error is the discovery lane's failure.
    pub fn discovery_turn(
        &mut self,
        s: &Settings,
        now: Instant,
        ctx: &DiscoveryCtx<'_>,
        log: &Log,
    ) -> Result<DiscoveryTurn> {
        let mut turn = DiscoveryTurn::Nothing;
        if let Some(d) = self.discoverer.as_mut() {
            match d.try_receive() {
                Ok(Some((scope, report))) => {
                    let stale = scope != self.scope;
                    match report {
                        Report::Failed(e) => return Err(e),
                        Report::Connected => turn = DiscoveryTurn::Connected,
                        _ if stale => {}
                        Report::Discovered(found) => {
                            self.apply_discovered(found, s, now, log);
                            turn = DiscoveryTurn::Applied;
                        }
                        Report::Monitored(infos) => {
                            self.apply_monitored(infos, s, log);
                            turn = DiscoveryTurn::Applied;
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.discoverer = None;
                    return Err(e);
                }
            }
        }
        if ctx.may_send {
            self.send_due_job(s, now, ctx)?;
        }
        Ok(turn)
    }

    /// A key-value pass saw stream keys: when one of them matches the patterns and is not
    /// tracked, discovery runs now (with that pass's list) rather than at its interval.
    pub fn streams_seen(&mut self, s: &Settings, learned: &Learned, now: Instant) {
        if !s.stream_auto_discovery || !key_values_cover_discovery(s) {
            return;
        }
        let patterns: Vec<crate::parse::Pattern> =
            s.stream_discovery_patterns.iter().map(|p| crate::parse::Pattern::new(p)).collect();
        let new = learned.streams.iter().any(|(db, key)| {
            s.db_search_range.contains(db)
                && super::owner(*db, key, s.workers) == s.stream_worker
                && patterns.iter().any(|p| p.matches(key))
                && !self.index.contains_key(&(*db, key.clone()))
        });
        if new {
            self.next_discovery = self.next_discovery.min(now);
        }
    }

    /// Is a discovery or monitor job under way?
    pub fn discovery_busy(&self) -> bool {
        self.discoverer.as_ref().is_some_and(Discoverer::busy)
    }

    /// When the discovery lane next has something to do.
    pub fn discovery_wait(&self, s: &Settings, now: Instant) -> Duration {
        let next = match s.mode {
            Mode::Sync => self.next_discovery,
            Mode::Monitor => self.next_discovery.min(self.next_monitor),
        };
        next.saturating_duration_since(now)
    }

    fn send_due_job(&mut self, s: &Settings, now: Instant, ctx: &DiscoveryCtx<'_>) -> Result<()> {
        if self.discoverer.as_ref().is_some_and(Discoverer::busy) {
            return Ok(());
        }
        let asked = ctx.requested > self.discover_served;
        let job = if asked || ctx.probe || now >= self.next_discovery {
            self.serving = ctx.requested;
            // The stream keys of a complete key-value pass that started after the last
            // discovery started stand in for a walk; a request of redis_sync_discover()
            // always walks (it answers for the keyspace as it is now).
            let since = self.discovery_started;
            let fresh = ctx.learned.filter(|l| {
                !asked && key_values_cover_discovery(s) && since.is_some_and(|t| l.at >= t)
            });
            self.discovery_started = Some(now);
            self.log_search(s, fresh.is_some());
            // Landing records up to here were written before the pending lists are read:
            // those holding no ID still pending may go when the report comes.
            self.records_floor = if self.streams.iter().any(|t| t.route.is_some()) {
                crate::routes::landed_max().unwrap_or(None)
            } else {
                None
            };
            Job::Discover {
                settings: Box::new(s.clone()),
                supplied: fresh.map(|l| l.streams.clone()),
                has_group: self
                    .streams
                    .iter()
                    .filter(|t| {
                        !t.unreadable && matches!(t.state, StreamState::Active | StreamState::Error)
                    })
                    .map(|t| (t.db, t.key.clone()))
                    .collect(),
                routed: self
                    .streams
                    .iter()
                    .filter(|t| t.route.is_some())
                    .map(|t| (t.db, t.key.clone()))
                    .collect(),
                scope: self.scope,
            }
        } else if s.mode == Mode::Monitor && now >= self.next_monitor {
            self.next_monitor = now + s.monitor_interval;
            Job::Monitor {
                settings: Box::new(s.clone()),
                streams: self.streams.iter().map(|t| (t.db, t.key.clone())).collect(),
                scope: self.scope,
            }
        } else {
            return Ok(());
        };
        let d = match self.discoverer.as_mut() {
            Some(d) => d,
            None => {
                let wake = ctx
                    .waker
                    .handle()
                    .map_err(|e| SyncError::Config(format!("cannot start discovery: {e}")))?;
                self.discoverer.insert(Discoverer::start(ctx.budget.clone(), wake)?)
            }
        };
        if let Err(e) = d.send(job) {
            self.discoverer = None;
            return Err(e);
        }
        Ok(())
    }

    /// "Searching Redis databases ..." once per change of what is searched.
    fn log_search(&mut self, s: &Settings, _learned: bool) {
        if !s.stream_auto_discovery || s.stream_discovery_patterns.is_empty() {
            return;
        }
        let search = format!(
            "Searching Redis databases {} for streams matching {}",
            crate::parse::format_db_range(&s.db_search_range),
            s.stream_discovery_patterns.join(", ")
        );
        if search != self.last_search {
            self.last_search = search;
            self.search_logged = false;
        }
    }

    /// Applies a discovery: the tracked set reconciled, groups, figures and claims taken in,
    /// every stream's pending entries read first again (the safety net for a read whose
    /// reply was lost), a new generation published.
    fn apply_discovered(&mut self, d: Discovered, s: &Settings, now: Instant, log: &Log) {
        self.next_discovery = now + s.stream_discovery_interval;
        self.group = s.consumer_group.clone();
        if !self.search_logged {
            let mut line = self.last_search.clone();
            if !d.missing_dbs.is_empty() {
                let missing = crate::parse::format_db_range(&d.missing_dbs);
                line.push_str(&if s.redis.cluster {
                    format!(" (a Redis Cluster has database 0 only: {missing} skipped)")
                } else {
                    format!(" (the server has no database {missing}: skipped)")
                });
            }
            if !line.is_empty() {
                log.info(&line);
            }
            self.search_logged = true;
        }
        let mut kept = Vec::new();
        let mut outcome: HashMap<(u8, Vec<u8>), Found> = HashMap::new();
        for f in d.found {
            kept.push((f.db, f.key.clone(), f.configured));
            outcome.insert((f.db, f.key.clone()), f);
        }
        let changes = self.reconcile(kept, s.redis.db);
        log_changes(&changes, log);
        self.assign_routes(log);
        let mut slots = Vec::new();
        let mut forget = Vec::new();
        for (i, t) in self.streams.iter_mut().enumerate() {
            let Some(f) = outcome.remove(&(t.db, t.key.clone())) else { continue };
            match (&f.group, s.mode) {
                (_, Mode::Monitor) => t.state = StreamState::Monitored,
                // Its group cannot be made (another type now, a user without XGROUP, out
                // of memory): kept in sight, in state error, and looked at again next time.
                (Some(GroupState::Failed(e)), _) => {
                    t.mark_unreadable(format!("its consumer group cannot be created: {e}"), log);
                }
                (Some(GroupState::Missing), _) => {
                    t.state = StreamState::NoGroup;
                    t.last_error = format!(
                        "consumer group \"{}\" does not exist and redis_sync.auto_create_consumer_groups is off",
                        s.consumer_group
                    );
                }
                (_, Mode::Sync) => {
                    if t.unreadable {
                        log.info(&format!("stream \"{}\" is read again", t.stream_key));
                        t.unreadable = false;
                        t.state = StreamState::Active;
                        t.last_error.clear();
                    } else if matches!(t.state, StreamState::NoGroup | StreamState::Monitored) {
                        t.state = StreamState::Active;
                        t.last_error.clear();
                    }
                }
            }
            if let Some(info) = &f.info {
                t.group_pending = info.pending;
                t.group_consumers = info.consumers;
                slots.push((i, info.clone()));
            }
            t.note_lost(f.lost, log);
            if let (Some(pending), Some(floor)) = (&f.pending, self.records_floor) {
                forget.push((t.stream_key.clone(), pending.clone(), floor));
            }
            match f.claimed {
                Ok(0) => {}
                Ok(_) => t.cursor = Cursor::Pending("0".into()),
                Err(e) => t.last_error = e,
            }
        }
        if let Err(e) = crate::routes::forget_landed(&s.consumer_group, &forget) {
            log.warning(&format!(
                "landing records not cleared (tried again at the next discovery): {e}"
            ));
        }
        if s.mode == Mode::Sync {
            // Refused entries waiting for proof are tried again too: the cause may be gone
            // with no new entry coming to show it.
            for t in &mut self.streams {
                t.wait_for_new = false;
            }
            self.restart_from_pending();
        }
        // Slots first (a new stream gets a fresh slot), then the figures that go in them.
        self.publish_all();
        shmem::update_streams(|tbl| {
            for (i, info) in &slots {
                if let Some(slot) = tbl.slots[self.slots.clone()].get_mut(*i) {
                    slot.set_info(info);
                }
            }
        });
        self.discover_served = self.serving;
        self.publish_discovery(&changes.added);
    }

    /// Keeps what is still there, adds what is new (in name order), drops discovered streams
    /// that are gone (their entries went with them). Pure: no Redis, no Postgres.
    fn reconcile(&mut self, found: Vec<Found3>, default_db: u8) -> Reconciled {
        let mut keep: HashMap<(u8, Vec<u8>), bool> = HashMap::new();
        for (db, key, configured) in found {
            *keep.entry((db, key)).or_insert(false) |= configured;
        }
        let before = self.streams.len();
        self.streams.retain(|t| keep.contains_key(&(t.db, t.key.clone())));
        let removed = before - self.streams.len();
        let known: HashSet<(u8, Vec<u8>)> =
            self.streams.iter().map(|t| (t.db, t.key.clone())).collect();
        let mut new_keys: Vec<((u8, Vec<u8>), bool)> =
            keep.into_iter().filter(|(k, _)| !known.contains(k)).collect();
        new_keys.sort();
        let mut added = Vec::new();
        for ((db, key), configured) in new_keys {
            let stream_key = stream_key_name(db, default_db, &key);
            added.push(stream_key.clone());
            self.streams.push(Tracked::new(db, key, stream_key, configured));
        }
        self.reindex();
        Reconciled { added, removed }
    }

    /// Ends a discovery pass: a new generation, with which streams it found and added, for
    /// `redis_sync_discover()`.
    fn publish_discovery(&mut self, added: &[String]) {
        self.discovery_gen += 1;
        let gen = self.discovery_gen;
        self.publish_all();
        let added: HashSet<&str> = added.iter().map(String::as_str).collect();
        shmem::update_streams(|t| {
            for (slot, st) in t.slots[self.slots.clone()].iter_mut().zip(&self.streams) {
                slot.found_gen = gen;
                if added.contains(st.stream_key.as_str()) {
                    slot.added_gen = gen;
                }
            }
            let k = usize::from(crate::gucs::stream_worker());
            if let Some(g) = t.discovery_gen.get_mut(k) {
                *g = gen;
            }
            if let Some(a) = t.discovery_answered.get_mut(k) {
                *a = self.discover_served;
            }
        });
    }
}

fn log_changes(changes: &Reconciled, log: &Log) {
    if !changes.added.is_empty() {
        let added = &changes.added;
        shmem::bump(|c| &c.streams_discovered, added.len() as u64);
        let shown: Vec<&str> = added.iter().take(10).map(String::as_str).collect();
        let more = if added.len() > 10 {
            format!(" and {} more", added.len() - 10)
        } else {
            String::new()
        };
        log.info(&format!("tracking {} new stream(s): {}{more}", added.len(), shown.join(", ")));
    }
    if changes.removed > 0 {
        log.info(&format!(
            "{} stream(s) no longer exist and are no longer tracked",
            changes.removed
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_keeps_adds_in_order_and_drops_the_vanished() {
        let mut s = StreamSync::new(Instant::now());
        let got = s.reconcile(
            vec![(0, b"b".to_vec(), false), (3, b"a".to_vec(), false), (0, b"a".to_vec(), true)],
            0,
        );
        assert_eq!(got.added, vec!["a", "b", "db3:a"]);
        assert_eq!(got.removed, 0);
        assert!(s.streams[0].configured && !s.streams[1].configured);
        // A stream found twice (configured and by a pattern) is one stream, configured.
        s.streams[1].messages_synced = 7;
        let got = s.reconcile(
            vec![(0, b"a".to_vec(), false), (0, b"b".to_vec(), true), (0, b"b".to_vec(), false)],
            0,
        );
        assert_eq!(got, Reconciled { added: vec![], removed: 1 });
        assert_eq!(s.streams.len(), 2);
        // What was kept keeps its figures; the index follows.
        assert_eq!(s.streams[s.index[&(0, b"b".to_vec())]].messages_synced, 7);
        assert!(!s.index.contains_key(&(3, b"a".to_vec())));
    }
}

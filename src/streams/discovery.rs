//! Discovery: the configured streams plus every stream matching the patterns in every
//! database of the search range, reconciled with what is tracked; consumer groups created;
//! XINFO figures refreshed; idle entries of dead consumers claimed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use super::{stream_key_name, Cursor, StreamSync, Tracked};
use crate::error::Result;
use crate::gucs::{Mode, Settings};
use crate::parse::Pattern;
use crate::redis::Redis;
use crate::shmem::{self, StreamState};

/// SCAN page size.
const SCAN_COUNT: u32 = 1000;

/// A stream found by discovery: database, key, and whether it is configured by name.
type Found = (u8, Vec<u8>, bool);

/// What reconciling the tracked set with a discovery's findings changed.
#[derive(Debug, Default, PartialEq)]
struct Reconciled {
    /// Names (as stored) of the streams tracked from now on.
    added: Vec<String>,
    removed: usize,
}

impl StreamSync {
    /// Finds the streams to sync, reconciles the tracked set, creates consumer groups,
    /// refreshes the per-stream figures, and claims idle entries of dead consumers.
    pub fn discover(
        &mut self,
        redis: &mut Redis,
        s: &Settings,
        now: Instant,
        log: &dyn Fn(&str),
    ) -> Result<()> {
        self.next_discovery = now + s.stream_discovery_interval;
        self.group = s.consumer_group.clone();
        let found = self.candidates(redis, s, log)?;
        let changes = self.reconcile(found, s.redis.db);
        log_changes(&changes, log);
        if s.mode == Mode::Monitor {
            // Look, do not touch: no groups created, nothing claimed or read.
            for t in &mut self.streams {
                t.state = StreamState::Monitored;
            }
            self.publish_discovery(&changes.added);
            return Ok(());
        }
        self.ensure_groups(redis, s)?;
        let in_use: BTreeSet<u8> = self.streams.iter().map(|t| t.db).collect();
        redis.retain_connections(&in_use);
        // Slots first (a new stream gets a fresh slot), then the figures that go in them.
        self.publish_all();
        self.refresh_info(redis, s)?;
        self.claim(redis, s)?;
        // The safety net: anything left in our pending list (a read whose reply was lost)
        // is read again now. The caller makes sure no read is in flight.
        self.restart_from_pending();
        self.publish_discovery(&changes.added);
        Ok(())
    }

    /// The configured streams, and with discovery on every stream whose name matches a
    /// pattern in a database of the search range (SCAN ... TYPE stream, never KEYS).
    fn candidates(
        &mut self,
        redis: &mut Redis,
        s: &Settings,
        log: &dyn Fn(&str),
    ) -> Result<Vec<Found>> {
        let mut found: Vec<Found> =
            s.streams.iter().map(|name| (s.redis.db, name.as_bytes().to_vec(), true)).collect();
        if !s.stream_auto_discovery || s.stream_discovery_patterns.is_empty() {
            return Ok(found);
        }
        let patterns: Vec<Pattern> =
            s.stream_discovery_patterns.iter().map(|p| Pattern::new(p)).collect();
        let search = format!(
            "Searching Redis databases {} for streams matching {}",
            crate::parse::format_db_range(&s.db_search_range),
            s.stream_discovery_patterns.join(", ")
        );
        if search != self.last_search {
            log(&search);
            self.last_search = search;
        }
        let globs = crate::parse::redis_globs(&patterns);
        for (db, key) in redis.scan_streams(&s.db_search_range, &globs, SCAN_COUNT)? {
            // Confirm client-side: fnmatch semantics are the contract.
            if patterns.iter().any(|p| p.matches(&key)) {
                found.push((db, key, false));
            }
        }
        Ok(found)
    }

    /// Keeps what is still there, adds what is new (in name order), drops discovered streams
    /// that are gone (their entries went with them). Pure: no Redis, no Postgres.
    fn reconcile(&mut self, found: Vec<Found>, default_db: u8) -> Reconciled {
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

    /// Groups for the new streams (and for any stream still waiting for its group); a
    /// stream whose group cannot be created is no longer tracked.
    fn ensure_groups(&mut self, redis: &mut Redis, s: &Settings) -> Result<()> {
        let mut gone = Vec::new();
        for i in 0..self.streams.len() {
            let t = &self.streams[i];
            let fresh = t.messages_synced == 0 && t.last_id.is_empty();
            if !(fresh || t.state == StreamState::NoGroup) {
                continue;
            }
            match self.ensure_group(redis, i, s) {
                Ok(()) => {}
                Err(e) if e.connection_lost() => return Err(e),
                Err(_) => gone.push(i),
            }
        }
        for i in gone.into_iter().rev() {
            self.streams.remove(i);
        }
        self.reindex();
        Ok(())
    }

    /// Creates the consumer group of stream `i` when missing (and allowed to).
    fn ensure_group(&mut self, redis: &mut Redis, i: usize, s: &Settings) -> Result<()> {
        let t = &mut self.streams[i];
        if s.auto_create_consumer_groups {
            match redis.create_group(t.db, &t.key, &s.consumer_group, t.configured) {
                Ok(_) => {
                    t.state = StreamState::Active;
                    Ok(())
                }
                Err(e) => {
                    t.last_error = e.to_string();
                    Err(e)
                }
            }
        } else {
            let info = redis.stream_info(t.db, &s.consumer_group, &[&t.key])?;
            let exists = info.first().and_then(|i| i.as_ref()).is_some_and(|i| i.group_exists);
            t.state = if exists { StreamState::Active } else { StreamState::NoGroup };
            if !exists {
                t.last_error = format!(
                    "consumer group \"{}\" does not exist and redis_sync.auto_create_consumer_groups is off",
                    s.consumer_group
                );
            }
            Ok(())
        }
    }

    /// Length, first/last IDs, pending, lag and consumers of every stream: one pipelined
    /// round trip per database.
    fn refresh_info(&mut self, redis: &mut Redis, s: &Settings) -> Result<()> {
        for (db, idx) in self.by_db() {
            let keys: Vec<&[u8]> = idx.iter().map(|&i| self.streams[i].key.as_slice()).collect();
            let infos = redis.stream_info(db, &s.consumer_group, &keys)?;
            let mut slots = Vec::new();
            for (&i, info) in idx.iter().zip(infos) {
                let Some(info) = info else { continue };
                let t = &mut self.streams[i];
                t.group_pending = info.pending;
                t.group_consumers = info.consumers;
                slots.push((i, info));
            }
            shmem::update_streams(|tbl| {
                for (i, info) in &slots {
                    if let Some(slot) = tbl.slots.get_mut(*i) {
                        slot.set_info(info);
                    }
                }
            });
        }
        Ok(())
    }

    /// Claims entries other consumers left pending longer than `claim_min_idle`; they join
    /// our pending list and are read from there.
    fn claim(&mut self, redis: &mut Redis, s: &Settings) -> Result<()> {
        for t in &mut self.streams {
            if t.state != StreamState::Active || t.group_pending == 0 || t.group_consumers < 2 {
                continue;
            }
            let n = redis.claim_idle(
                t.db,
                &t.key,
                &s.consumer_group,
                &s.consumer_name,
                s.claim_min_idle,
                s.batch_size,
            );
            match n {
                Ok(0) => {}
                Ok(_) => t.cursor = Cursor::Pending("0".into()),
                Err(e) if e.connection_lost() => return Err(e),
                Err(e) => t.last_error = e.to_string(),
            }
        }
        Ok(())
    }

    /// Ends a discovery pass: a new generation, with which streams it found and added, for
    /// `redis_sync_discover()`.
    fn publish_discovery(&mut self, added: &[String]) {
        self.discovery_gen += 1;
        let gen = self.discovery_gen;
        self.publish_all();
        let added: HashSet<&str> = added.iter().map(String::as_str).collect();
        shmem::update_streams(|t| {
            for (slot, st) in t.slots.iter_mut().zip(&self.streams) {
                slot.found_gen = gen;
                if added.contains(st.stream_key.as_str()) {
                    slot.added_gen = gen;
                }
            }
            t.discovery_gen = gen;
        });
    }
}

fn log_changes(changes: &Reconciled, log: &dyn Fn(&str)) {
    if !changes.added.is_empty() {
        let added = &changes.added;
        shmem::bump(|c| &c.streams_discovered, added.len() as u64);
        let shown: Vec<&str> = added.iter().take(10).map(String::as_str).collect();
        let more = if added.len() > 10 {
            format!(" and {} more", added.len() - 10)
        } else {
            String::new()
        };
        log(&format!("tracking {} new stream(s): {}{more}", added.len(), shown.join(", ")));
    }
    if changes.removed > 0 {
        log(&format!("{} stream(s) no longer exist and are no longer tracked", changes.removed));
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

//! Key-value sync, the key-value lane: every key matching `key_value_patterns` in every
//! database of `db_search_range` is mirrored into the key-value table, pass after pass. The
//! scanner thread does the Redis side (SCAN pages, values fetched in pipelined round trips:
//! an `MGET` and the expiries, then the other types); the main thread compares and writes a
//! chunk of a page per turn of its loop, so stream writes never wait behind a long pass. Only
//! keys whose value, type or expiry changed are written. Keys gone from Redis are handled by
//! `key_value_deletes`, and only after a complete pass against the same Redis server.
//!
//! Between passes the worker remembers a fingerprint of every key it mirrored (32 bytes a
//! key in a hash table, up to about twice that with its spare room), for at most
//! `key_value_max_remembered` keys: beyond that, keys not remembered are compared with the
//! table at every pass. A key whose fingerprint is unchanged is not sent to Postgres at all,
//! and when every remembered key was seen again no deletion check is needed: an idle pass
//! costs the Redis reads and nothing else. Keys bigger than `key_value_max_size` are never
//! fetched: they are reported once and listed by `redis_sync_skipped_keys()`. The memory is trusted only while the Redis server
//! (its run ID), the table (its oid and relfilenode: a TRUNCATE or a re-created table voids
//! it) and the scope are those it was built with, and at least every
//! `key_value_verify_interval` a pass compares every key with the table again.

mod events;
mod memory;
mod notify;
mod pass;
mod routed;
mod rows;
mod scanner;
mod writer;

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Result, SyncError};
use crate::gucs::Settings;
use crate::pg::Waker;
use crate::redis::SharedBudget;
use crate::routes::RouteSet;
use crate::streams::Learned;

pub use notify::{flags_cover_changes, Notifier, Scope};
pub use pass::PassSummary;
pub use writer::KvWriter;

use memory::{IdHasher, KeyId, KeyIds, Memory};
use pass::{Basis, Chunk, Pass};
use scanner::Scanner;

pub struct KeySync {
    pass: Option<Pass>,
    next_pass: Instant,
    /// Another pass was asked for while one ran: it starts as soon as that one ends.
    owed: bool,
    memory: Memory,
    /// Set when a complete pass left `memory` holding every live key of the table in scope.
    basis: Option<Basis>,
    /// Number of the last pass started.
    number: u16,
    /// Start of the last pass that compared every key with the table.
    verified: Option<Instant>,
    /// Keyed per process; shared with the scanner and notification threads.
    ids: Arc<KeyIds>,
    /// The memory reached `key_value_max_remembered` (said once).
    warned_full: bool,
    /// Expiries come from `PTTL` (said once).
    warned_pttl: bool,
    /// The Redis side of every pass; started on first use.
    scanner: Option<Scanner>,
    /// Keys a notification synced during the pass under way, and when their values were
    /// fetched: a page fetched before that is older than the table for them.
    event_times: HashMap<KeyId, Instant, BuildHasherDefault<IdHasher>>,
    /// The page being worked through, a chunk per turn.
    chunk: Option<Chunk>,
    /// Stream keys the last complete pass saw (discovery may use them instead of a walk).
    learned: Option<Learned>,
    /// Rows a chunk of a page writes, following the measured cost of a row.
    chunk_rows: usize,
    /// The key routes, as last loaded, the generation they were loaded at and when.
    routes: RouteSet,
    routes_gen: Option<u64>,
    routes_loaded: Option<Instant>,
    route_writers: routed::KeyRouteWriters,
}

/// Routes are loaded again at least this often (a change the trigger did not see).
const ROUTES_RELOAD: Duration = Duration::from_secs(10);

/// What the key-value lane needs from the main loop for one turn.
pub struct KvCtx<'a> {
    pub budget: &'a SharedBudget,
    pub waker: &'a Waker,
    /// The lane is not backing off: a pass may start.
    pub may_start: bool,
}

/// What a turn of the key-value lane did.
#[derive(Debug, Default)]
pub struct KvTurn {
    /// A pass finished.
    pub finished: Option<PassSummary>,
    /// The pass's scanning ended: the server's `notify-keyspace-events` (`None` inside when
    /// it cannot be read).
    pub notify_flags: Option<Option<String>>,
    /// Something was done (a message taken, a chunk written).
    pub worked: bool,
    /// Rows were written and committed.
    pub wrote: bool,
    /// A reply of Redis was taken: the server is reachable.
    pub heard: bool,
}

impl KeySync {
    pub fn new(now: Instant) -> KeySync {
        KeySync {
            pass: None,
            next_pass: now,
            owed: false,
            memory: Memory::default(),
            basis: None,
            number: 0,
            verified: None,
            ids: Arc::new(KeyIds::new()),
            warned_full: false,
            warned_pttl: false,
            scanner: None,
            event_times: HashMap::default(),
            chunk: None,
            learned: None,
            chunk_rows: 200,
            routes: RouteSet::default(),
            routes_gen: None,
            routes_loaded: None,
            route_writers: routed::KeyRouteWriters::default(),
        }
    }

    /// Loads the key routes again when they changed (or every few seconds). A change of
    /// what any route is voids the memory: the next pass compares every key again (and
    /// writes only what differs from the tables).
    pub fn follow_routes(&mut self, s: &Settings, now: Instant) {
        let gen = crate::shmem::routes_generation();
        let every =
            if self.routes.unreadable.is_some() { Duration::from_secs(1) } else { ROUTES_RELOAD };
        let due = self.routes_loaded.is_none_or(|t| now.saturating_duration_since(t) >= every);
        if self.routes_gen == Some(gen) && !due {
            return;
        }
        self.routes_loaded = Some(now);
        let set = match crate::routes::load(crate::routes::Kind::Key, &s.role) {
            Ok(set) => set,
            // Every key waits (a pass writes none) until they can be read.
            Err(e) => crate::routes::RouteSet::unreadable(e.to_string()),
        };
        self.routes_gen = Some(gen);
        let same = set.unreadable == self.routes.unreadable
            && set.routes.len() == self.routes.routes.len()
            && set.routes.iter().zip(&self.routes.routes).all(|(a, b)| **a == **b)
            && set.broken.len() == self.routes.broken.len()
            && set
                .broken
                .iter()
                .zip(&self.routes.broken)
                .all(|(a, b)| a.name == b.name && a.error == b.error);
        if same {
            return;
        }
        for b in &set.broken {
            pgrx::warning!("route \"{}\" cannot run: {}", b.name, b.error);
        }
        if let Some(e) = &set.unreadable {
            pgrx::warning!("the routes cannot be read, so no key is written: {e}");
        }
        self.routes = set;
        self.route_writers.reset();
        self.abandon();
        self.next_pass = now;
    }

    /// Is a pass under way?
    pub fn busy(&self) -> bool {
        self.pass.is_some()
    }

    /// How long the loop may wait as far as the key-value lane is concerned: not at all with
    /// a chunk of work in hand, until the next pass is due when idle; while a pass waits for
    /// the scanner, the scanner wakes the loop.
    pub fn wait(&self, now: Instant) -> Duration {
        if self.chunk.is_some() || self.pass.as_ref().is_some_and(Pass::has_local_work) {
            Duration::ZERO
        } else if self.pass.is_some() {
            crate::pg::MAX_WAIT
        } else {
            self.next_pass.saturating_duration_since(now)
        }
    }

    /// Is a pass due to start (none under way, its time come)?
    pub fn due(&self, now: Instant) -> bool {
        self.pass.is_none() && now >= self.next_pass
    }

    /// Starts the next pass now (events may have been missed).
    pub fn pass_now(&mut self, now: Instant) {
        self.next_pass = now;
        // Asked for while a pass runs (notifications just subscribed, say: what changed in
        // keys that pass had read already was not heard): owed after it.
        self.owed |= self.pass.is_some();
    }

    /// The maker of key ids and fingerprints, for the notification thread.
    pub fn ids(&self) -> Arc<KeyIds> {
        self.ids.clone()
    }

    /// Stream keys the last complete pass saw.
    pub fn learned(&self) -> Option<&Learned> {
        self.learned.as_ref()
    }

    /// Drops the pass under way and what is remembered (new settings: another scope or
    /// table): nothing is marked deleted from an incomplete pass.
    pub fn abandon(&mut self) {
        self.drop_pass();
        self.basis = None;
        self.memory = Memory::default();
        self.learned = None;
    }

    /// Ends the pass under way without a verdict; the scanner stops at its next page.
    fn drop_pass(&mut self) {
        self.pass = None;
        self.chunk = None;
        self.event_times.clear();
        if let Some(scanner) = self.scanner.as_mut() {
            scanner.cancel();
        }
    }

    /// One turn of the lane: start a pass when due, or take one message of the scanner, or
    /// write one chunk of a page, or walk one chunk of the deletion check. An error is the
    /// lane's failure: the pass is dropped (what was written stays remembered).
    pub fn step(
        &mut self,
        writer: &mut KvWriter,
        s: &Settings,
        now: Instant,
        ctx: &KvCtx<'_>,
    ) -> Result<KvTurn> {
        if !s.mirrors_key_values() {
            self.drop_pass();
            return Ok(KvTurn::default());
        }
        let outcome = match self.pass {
            None if now >= self.next_pass && ctx.may_start => self
                .start(writer, s, now, ctx)
                .map(|()| KvTurn { worked: true, ..Default::default() }),
            None => Ok(KvTurn::default()),
            Some(_) => self.advance(writer, s),
        };
        if let Err(e) = &outcome {
            self.drop_pass();
            if matches!(e, SyncError::ThreadStopped(_)) {
                self.scanner = None;
            }
            // (A pass owed is retried as the lane's backoff allows.)
            self.next_pass =
                if std::mem::take(&mut self.owed) { now } else { now + s.sync_interval };
        }
        outcome
    }
}

//! Key-value sync: every key matching `key_value_patterns` in every database of
//! `db_search_range` is mirrored into the key-value table, pass after pass, one SCAN page at
//! a time (so stream sync keeps going during a long pass). Values of a page are fetched in
//! pipelined round trips (an `MGET` and the expiries, then the other types); only keys whose
//! value, type or expiry changed are written. Keys gone from Redis are handled by
//! `key_value_deletes`, and only after a complete pass against the same Redis server.
//!
//! Between passes the worker remembers a fingerprint of every key it mirrored (24 bytes a
//! key in a hash table, up to twice that with its spare room). A key whose fingerprint is unchanged is not sent to Postgres at all, and
//! when every remembered key was seen again no deletion check is needed: an idle pass costs
//! the Redis reads and nothing else. The memory is trusted only while the Redis server
//! (its run ID), the table (its oid and relfilenode: a TRUNCATE or a re-created table voids
//! it) and the scope are those it was built with, and at least every
//! `key_value_verify_interval` a pass compares every key with the table again.

mod events;
mod memory;
mod notify;
mod pass;
mod rows;
mod scanner;
mod writer;

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::gucs::Settings;
use crate::redis::Redis;

pub use notify::{flags_cover_changes, Notifier};
pub use pass::PassSummary;
pub use writer::{KvTarget, KvWriter};

use memory::{IdHasher, KeyId, KeyIds, Memory};
use pass::{Basis, Pass};
use scanner::Scanner;

pub struct KeySync {
    pass: Option<Pass>,
    next_pass: Instant,
    memory: Memory,
    /// Set when a complete pass left `memory` holding every live key of the table in scope.
    basis: Option<Basis>,
    /// Number of the last pass started.
    number: u16,
    /// Start of the last pass that compared every key with the table.
    verified: Option<Instant>,
    ids: KeyIds,
    /// Runs the SCANs and fetches values a page or two ahead; started on first use.
    scanner: Option<Scanner>,
    /// Keys a notification synced during the pass under way, and when: a page fetched
    /// before that is older than the table for them.
    event_times: HashMap<KeyId, Instant, BuildHasherDefault<IdHasher>>,
}

impl KeySync {
    pub fn new(now: Instant) -> KeySync {
        KeySync {
            pass: None,
            next_pass: now,
            memory: Memory::default(),
            basis: None,
            number: 0,
            verified: None,
            ids: KeyIds::new(),
            scanner: None,
            event_times: HashMap::default(),
        }
    }

    /// Is a pass under way (the worker then does not block on stream reads)?
    pub fn busy(&self) -> bool {
        self.pass.is_some()
    }

    /// Time until the next pass starts.
    pub fn until_next_pass(&self, now: Instant) -> Duration {
        self.next_pass.saturating_duration_since(now)
    }

    /// Starts the next pass now (events may have been missed).
    pub fn pass_now(&mut self, now: Instant) {
        self.next_pass = now;
    }

    /// Drops the pass under way and what is remembered (new settings: another scope or
    /// table): nothing is marked deleted from an incomplete pass.
    pub fn abandon(&mut self) {
        self.drop_pass();
        self.basis = None;
        self.memory = Memory::default();
    }

    /// Ends the pass under way without a verdict; the scanner stops at its next page.
    fn drop_pass(&mut self) {
        self.pass = None;
        self.event_times.clear();
        if let Some(scanner) = self.scanner.as_mut() {
            scanner.cancel();
        }
    }

    /// Does one page of work. Returns the summary when a pass finished. `tick` is called
    /// every 100 ms while waiting for the scanner thread.
    pub fn step(
        &mut self,
        redis: &mut Redis,
        writer: &mut KvWriter,
        s: &Settings,
        now: Instant,
        tick: &dyn Fn(),
    ) -> Result<Option<PassSummary>> {
        if !s.key_value_auto_discovery || s.key_value_patterns.is_empty() {
            self.drop_pass();
            return Ok(None);
        }
        if self.pass.is_none() && now < self.next_pass {
            return Ok(None);
        }
        let target = KvTarget { schema: s.schema.clone(), table: s.key_value_table.clone() };
        writer.prepare(&target)?;
        let outcome = match self.pass {
            None => self.start(redis, writer, &target, s, now).map(|()| None),
            Some(_) => self.page(redis, writer, s, tick),
        };
        if let Err(e) = &outcome {
            // What was written stays remembered; what failed was not recorded as written.
            self.drop_pass();
            if matches!(e, crate::error::SyncError::ThreadStopped(_)) {
                self.scanner = None;
            }
            self.next_pass = now + s.sync_interval;
        }
        outcome
    }
}

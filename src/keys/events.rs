//! Keys named by keyspace notifications, synced at once between passes.

use std::time::Instant;

use super::memory::{fingerprint, pack, pass_of};
use super::rows::{key_row, report_refused};
use super::scanner::fetch;
use super::writer::{KvTarget, KvWriter};
use super::KeySync;
use crate::encode::encode_name;
use crate::error::Result;
use crate::gucs::{KeyValueDeletes, Settings};
use crate::parse::Pattern;
use crate::redis::Redis;
use crate::shmem;

impl KeySync {
    /// Syncs keys named by keyspace notifications right away: changed ones are upserted,
    /// ones Redis says no longer exist get the deletion policy. Returns the rows touched.
    pub fn apply_events(
        &mut self,
        redis: &mut Redis,
        writer: &mut KvWriter,
        s: &Settings,
        mut events: Vec<(u8, Vec<u8>)>,
    ) -> Result<usize> {
        if !s.key_value_auto_discovery || events.is_empty() {
            return Ok(0);
        }
        writer.prepare(&KvTarget { schema: s.schema.clone(), table: s.key_value_table.clone() })?;
        let patterns: Vec<Pattern> = s.key_value_patterns.iter().map(|p| Pattern::new(p)).collect();
        events.retain(|(db, key)| {
            s.db_search_range.contains(db) && patterns.iter().any(|p| p.matches(key))
        });
        events.sort();
        events.dedup();
        // A key first met here is not "seen" by the pass under way (if any): should it go
        // away again, the pass's deletion check must find it.
        let unseen = match &self.pass {
            Some(p) => p.number.wrapping_sub(1),
            None => self.number,
        };
        let mut touched = 0;
        let mut i = 0;
        while i < events.len() {
            let db = events[i].0;
            let keys: Vec<Vec<u8>> =
                events[i..].iter().take_while(|(d, _)| *d == db).map(|(_, k)| k.clone()).collect();
            i += keys.len();
            let values = fetch(redis, db, &keys)?;
            let mut rows = Vec::new();
            let mut pending = Vec::new();
            let mut gone = Vec::new();
            let now = Instant::now();
            for (key, (ty, expires, value)) in keys.iter().zip(values) {
                let id = self.ids.id(db, key);
                if self.pass.is_some() {
                    self.event_times.insert(id, now);
                }
                if ty == "none" {
                    gone.push(encode_name(key));
                    self.memory.remove(&id);
                    continue;
                }
                let Some(value) = value else { continue };
                let fingerprint = fingerprint(&ty, expires, &value);
                if let Some(row) = key_row(key, &ty, expires, value) {
                    rows.push(row);
                    pending.push((id, fingerprint));
                }
            }
            let mut refused = Vec::new();
            touched += writer.upsert_isolating(db, &rows, &mut refused)?;
            report_refused(db, &rows, &refused);
            for (id, fingerprint) in pending {
                let number = self.memory.get(&id).map_or(unseen, |v| pass_of(*v));
                self.memory.insert(id, pack(fingerprint, number));
            }
            if !gone.is_empty() && s.key_value_deletes != KeyValueDeletes::Ignore {
                touched +=
                    writer.gone(db, &gone, s.key_value_deletes == KeyValueDeletes::Delete)?;
            }
        }
        if touched > 0 {
            shmem::bump(|c| &c.key_values_processed, touched as u64);
            let now = shmem::now();
            shmem::update(|st| st.last_sync_time = now);
        }
        Ok(touched)
    }
}

//! Keys named by keyspace notifications, already fetched by the notification thread, written
//! at once between passes.

use super::memory::{fingerprint, pack, pass_of};
use super::notify::Changed;
use super::rows::{key_row, report_refused};
use super::writer::{KvTarget, KvWriter};
use super::KeySync;
use crate::encode::encode_name;
use crate::error::Result;
use crate::gucs::{KeyValueDeletes, Settings};
use crate::shmem;

impl KeySync {
    /// Writes keys that changed: changed ones are upserted, ones Redis says no longer exist
    /// get the deletion policy. What the worker remembers of them changes only once their
    /// rows are committed. Returns the rows touched.
    pub fn apply_changes(
        &mut self,
        writer: &mut KvWriter,
        s: &Settings,
        changed: Changed,
    ) -> Result<usize> {
        if !s.key_value_auto_discovery {
            return Ok(0);
        }
        writer.prepare(&KvTarget { schema: s.schema.clone(), table: s.key_value_table.clone() })?;
        let Changed { db, keys, metas, fetched_at } = changed;
        // A key first met here is not "seen" by the pass under way (if any): should it go
        // away again, the pass's deletion check must find it.
        let unseen = match &self.pass {
            Some(p) => p.number.wrapping_sub(1),
            None => self.number,
        };
        let mut rows = Vec::new();
        let mut pending = Vec::new();
        let mut gone = Vec::new();
        let mut gone_ids = Vec::new();
        for (key, (ty, expires, value)) in keys.iter().zip(metas) {
            let id = self.ids.id(db, key);
            if self.pass.is_some() {
                self.event_times.insert(id, fetched_at);
            }
            if ty == "none" {
                gone.push(encode_name(key));
                gone_ids.push(id);
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
        let mut touched = writer.upsert_isolating(db, &rows, &mut refused)?;
        report_refused(db, &rows, &refused);
        for (id, fingerprint) in pending {
            let number = self.memory.get(&id).map_or(unseen, |v| pass_of(*v));
            self.memory.insert(id, pack(fingerprint, number));
        }
        if !gone.is_empty() && s.key_value_deletes != KeyValueDeletes::Ignore {
            touched += writer.gone(db, &gone, s.key_value_deletes == KeyValueDeletes::Delete)?;
        }
        // Forgotten only now that the deletion is committed: had it failed, the key would
        // still be remembered, and the deletion check would find it.
        for id in gone_ids {
            self.memory.remove(&id);
        }
        if touched > 0 {
            shmem::bump(|c| &c.key_values_processed, touched as u64);
            let now = shmem::now();
            shmem::update(|st| st.last_sync_time = now);
        }
        Ok(touched)
    }
}

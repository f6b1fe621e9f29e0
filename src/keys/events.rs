//! Keys named by keyspace notifications, already fetched by the notification thread, written
//! at once between passes.

use super::memory::KeyId;
use super::memory::{pass_of, remember};
use super::notify::Changed;
use super::pass::{skipped, RoutedRow};
use super::routed;
use super::rows::{report_refused, Found};
use super::writer::{KvTarget, KvWriter};
use super::KeySync;
use crate::encode::encode_name;
use crate::error::Result;
use crate::gucs::{KeyValueDeletes, Settings};
use crate::routes::mapping::Cell;
use crate::routes::Destination;
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
        let Changed { db, keys, found, fetched_at } = changed;
        // A key first met here is not "seen" by the pass under way (if any): should it go
        // away again, the pass's deletion check must find it.
        let unseen = match &self.pass {
            Some(p) => p.number.wrapping_sub(1),
            None => self.number,
        };
        let cap = s.key_value_max_remembered;
        let mut rows = Vec::new();
        let mut routed_rows: Vec<RoutedRow> = Vec::new();
        let mut pending = Vec::new();
        let mut gone = Vec::new();
        let mut gone_ids = Vec::new();
        let mut routed_gone: Vec<(std::sync::Arc<crate::routes::Route>, Vec<Cell>, KeyId)> =
            Vec::new();
        for (key, found) in keys.iter().zip(found) {
            let id = self.ids.id(db, key);
            if self.pass.is_some() {
                self.event_times.insert(id, fetched_at);
            }
            let destination = self.routes.destination(key);
            match (found, destination) {
                (Found::Value { .. } | Found::Gone, Destination::Broken(_)) => {}
                (Found::Value { fingerprint, row }, Destination::Route(route, parts)) => {
                    match routed::route_cells(&route, key, &parts, &row) {
                        // (Always upserted: a COPY buys nothing for a few keys.)
                        Ok(cells) => {
                            routed_rows.push((route, cells, key.clone(), id, fingerprint, true))
                        }
                        Err(why) => {
                            routed::report(&route.name, key, &why);
                            pending.push((id, fingerprint));
                        }
                    }
                }
                (Found::Gone, Destination::Route(route, parts)) => {
                    let cells = routed::key_cells(&route, key, &parts);
                    routed_gone.push((route, cells, id));
                }
                (Found::Value { fingerprint, mut row }, Destination::Generic) => {
                    row.fill_text(key);
                    rows.push(row);
                    pending.push((id, fingerprint));
                }
                (Found::Gone, Destination::Generic) => {
                    gone.push(encode_name(key));
                    gone_ids.push(id);
                }
                (Found::TooBig { ty, bytes }, _) => {
                    let number = self.memory.get(&id).map_or(unseen, |v| pass_of(*v));
                    skipped(&mut self.memory, id, db, key, &ty, bytes, number);
                }
                (Found::Stream | Found::Other, _) => {}
            }
        }
        let mut refused = Vec::new();
        let mut touched = writer.upsert_isolating(db, &rows, &mut refused)?;
        touched += self.write_routed(routed_rows, &mut pending);
        for (route, cells, id) in routed_gone {
            match self.route_writers.gone(&route, &[cells]) {
                Ok(n) => {
                    touched += n;
                    gone_ids.push(id);
                }
                Err(e) => {
                    // Remembered still: the deletion check finds it.
                    self.route_writers.reset();
                    routed::failed(&route.name, &e.to_string());
                }
            }
        }
        report_refused(db, &rows, &refused);
        let mut full = false;
        for (id, fingerprint) in pending {
            let number = self.memory.get(&id).map_or(unseen, |v| pass_of(*v));
            full |= !remember(&mut self.memory, cap, id, fingerprint, number);
        }
        if full {
            self.memory_full(cap);
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

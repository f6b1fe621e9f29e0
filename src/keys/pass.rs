//! One key-value pass on the main thread: start it (the table's identity; the scanner says
//! which server it is, which decides what the memory may be trusted for), take the scanner's
//! pages a chunk per turn (compare, write what changed, remember what committed), and finish
//! it (the deletion check, only after a complete pass against the same Redis server: the
//! table's live keys walked a chunk per turn, the missing ones confirmed gone by the scanner).

use std::time::Instant;

use super::memory::{
    fingerprint_of, pack, pass_of, remember, KeyId, Memory, NO_FINGERPRINT, TOO_BIG,
};
use super::routed;
use super::rows::{report_refused, Found, MIRRORED};
use super::scanner::{Msg, Page, Scanner};
use super::writer::{KvTarget, KvWriter};
use super::{KeySync, KvCtx, KvTurn};
use crate::encode::{decode_name, encode_name};
use crate::error::{Result, SyncError};
use crate::gucs::{KeyValueDeletes, Settings};
use crate::parse::Pattern;
use crate::redis::Databases;
use crate::routes::Destination;
use crate::shmem;
use crate::streams::Learned;

/// A key going to a route: the route, its row's cells, the key, its id and fingerprint, and
/// whether it is upserted (the worker's memory knows it, or a notification brought it)
/// rather than tried with a COPY.
pub(super) type RoutedRow = (
    std::sync::Arc<crate::routes::Route>,
    Vec<crate::routes::mapping::Cell>,
    Vec<u8>,
    KeyId,
    u64,
    bool,
);

/// Live keys read from the table per step of the deletion check.
const CHECK_CHUNK: i64 = 2_000;
/// How long one chunk of a page may take to write: a turn of the key-value worker's loop
/// stays short, so notified keys never wait long behind a pass, and a chunk is big enough
/// that its commit (a WAL flush) costs little beside its rows. The rows per chunk follow the
/// measured cost of a row.
const CHUNK_TIME: std::time::Duration = std::time::Duration::from_millis(20);
/// Keys of a page compared per turn, at most (even when none needs writing): a turn stays
/// short for the notified keys and stream entries waiting behind it.
const KEYS_PER_TURN: usize = 10_000;
/// Rows per chunk, at least and at most.
const CHUNK_ROWS: (usize, usize) = (50, 10_000);

/// Rows per chunk that take about [`CHUNK_TIME`] to write, from the last chunk's rows and
/// time, smoothed with the current figure. Pure.
pub(super) fn next_chunk_rows(current: usize, rows: usize, took: std::time::Duration) -> usize {
    if rows == 0 {
        return current;
    }
    let per_row = took.as_secs_f64() / rows as f64;
    let fit = if per_row > 0.0 { CHUNK_TIME.as_secs_f64() / per_row } else { CHUNK_ROWS.1 as f64 };
    let next = (current as f64 * 0.5 + fit * 0.5) as usize;
    next.clamp(CHUNK_ROWS.0, CHUNK_ROWS.1)
}
/// Keys asked about per confirmation.
const CONFIRM_CHUNK: usize = 1000;

/// What the memory was built against: when any of it differs, the memory is void.
#[derive(Clone, PartialEq, Debug)]
pub(super) struct Basis {
    run_id: String,
    table: (i64, i64),
}

pub(super) enum Phase {
    /// Waiting for the scanner to say which server it is.
    Starting,
    /// Pages are coming.
    Scanning,
    /// Walking the table's live keys for the ones the pass did not see, database by
    /// database, then each key route's target.
    Walking {
        db_index: usize,
        after: Option<String>,
        missing: Vec<(u8, String)>,
        routes: RouteWalk,
    },
    /// Waiting for the scanner to confirm which missing keys are gone.
    Confirming { outstanding: usize, gone: usize, routes: RouteWalk },
}

/// The deletion check's part for key routes: which target is walked and from where, the
/// keys its rows stand for that the pass did not see (by route), and, while confirming, the
/// answers still to come (`true`: a route's) and the keys found still there.
#[derive(Default)]
pub(super) struct RouteWalk {
    index: usize,
    after: Option<Vec<Option<String>>>,
    missing: Vec<(usize, Vec<u8>)>,
    answers: std::collections::VecDeque<bool>,
    present: std::collections::HashSet<Vec<u8>>,
}

pub(super) struct Pass {
    pub(super) phase: Phase,
    pub(super) patterns: Vec<Pattern>,
    /// This pass's number: a key whose memory carries it was seen by this pass.
    pub(super) number: u16,
    /// Unchanged fingerprints may skip Postgres (false on a verifying pass).
    pub(super) trusted: bool,
    /// The table's identity at the start.
    table: (i64, i64),
    basis: Option<Basis>,
    pub(super) started: Instant,
    pub(super) written: usize,
    pub(super) keys: usize,
    /// Stream keys seen, for discovery.
    streams: Vec<(u8, Vec<u8>)>,
    /// Keys remembered at most (`key_value_max_remembered`).
    pub(super) cap: usize,
}

impl Pass {
    /// Work the main thread can do without waiting for the scanner.
    pub(super) fn has_local_work(&self) -> bool {
        matches!(self.phase, Phase::Walking { .. })
    }
}

/// A page being worked through.
pub(super) struct Chunk {
    db: u8,
    fetched_at: Instant,
    items: std::iter::Zip<std::vec::IntoIter<Vec<u8>>, std::vec::IntoIter<Found>>,
}

/// What a pass found, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PassSummary {
    pub keys: usize,
    pub written: usize,
    pub gone: usize,
    pub complete: bool,
}

impl KeySync {
    pub(super) fn start(
        &mut self,
        writer: &mut KvWriter,
        s: &Settings,
        now: Instant,
        ctx: &KvCtx<'_>,
    ) -> Result<()> {
        let target = KvTarget { schema: s.schema.clone(), table: s.key_value_table.clone() };
        writer.prepare(&target)?;
        let mut table = writer.table_identity()?;
        if table.is_none() {
            // Dropped since the statements were prepared: create it again.
            writer.reset();
            writer.prepare(&target)?;
            table = writer.table_identity()?;
        }
        self.number = self.number.wrapping_add(1);
        if self.number == 0 {
            // Pass numbers wrapped: an old mark could pass for this pass's.
            self.basis = None;
            self.number = 1;
        }
        let patterns: Vec<Pattern> = s.key_value_patterns.iter().map(|p| Pattern::new(p)).collect();
        let scanner = match self.scanner.as_mut() {
            Some(scanner) => scanner,
            None => {
                let wake = ctx
                    .waker
                    .handle()
                    .map_err(|e| SyncError::Config(format!("cannot start the scanner: {e}")))?;
                self.scanner.insert(Scanner::start(ctx.budget.clone(), wake, self.ids.clone())?)
            }
        };
        scanner.begin(
            &s.redis,
            s.db_search_range.clone(),
            patterns.clone(),
            self.routes.patterns(),
            s.key_value_max_size,
        )?;
        self.event_times.clear();
        self.chunk = None;
        self.pass = Some(Pass {
            phase: Phase::Starting,
            patterns,
            number: self.number,
            trusted: false,
            table: table.unwrap_or_default(),
            basis: None,
            started: now,
            written: 0,
            keys: 0,
            streams: Vec::new(),
            cap: s.key_value_max_remembered,
        });
        Ok(())
    }

    /// One step of the pass under way.
    pub(super) fn advance(&mut self, writer: &mut KvWriter, s: &Settings) -> Result<KvTurn> {
        let worked = KvTurn { worked: true, ..Default::default() };
        if self.chunk.is_some() {
            let wrote = self.write_chunk(writer)?;
            return Ok(KvTurn { wrote, ..worked });
        }
        if self.pass.as_ref().is_some_and(Pass::has_local_work) {
            return self.walk_live_chunk(writer, s);
        }
        let Some(scanner) = self.scanner.as_mut() else {
            return Err(SyncError::ThreadStopped("scanner"));
        };
        let Some(msg) = scanner.try_next()? else { return Ok(KvTurn::default()) };
        let worked = KvTurn { heard: !matches!(msg, Msg::Failed(_)), ..worked };
        match msg {
            Msg::Started(dbs) => {
                self.started(dbs, s);
                Ok(worked)
            }
            Msg::Page(page) => {
                self.take_page(page);
                let wrote = self.write_chunk(writer)?;
                Ok(KvTurn { wrote, ..worked })
            }
            Msg::Done { run_id, notify_flags, pttl } => {
                if pttl && !self.warned_pttl {
                    self.warned_pttl = true;
                    pgrx::warning!(
                        "redis_pg_sync: this Redis has no PEXPIRETIME (before 7.0): expires_at is \
                         computed from PTTL at the time of the read, to the second"
                    );
                }
                let finished = self.scanned(&run_id, s);
                Ok(KvTurn { finished, notify_flags: Some(notify_flags), ..worked })
            }
            Msg::Types { db, keys, types } => {
                let finished = self.confirmed(writer, s, db, keys, types)?;
                Ok(KvTurn { finished, ..worked })
            }
            Msg::Failed(e) => Err(e),
        }
    }

    /// The scanner says which server this is: the memory is trusted only when it was built
    /// against the same server and table, and no verifying pass is due.
    fn started(&mut self, dbs: Databases, s: &Settings) {
        let Some(pass) = self.pass.as_mut() else { return };
        let basis = Basis { run_id: dbs.run_id, table: pass.table };
        let verify_due = self
            .verified
            .is_none_or(|t| pass.started.duration_since(t) >= s.key_value_verify_interval);
        pass.trusted = !verify_due && self.basis.as_ref() == Some(&basis);
        if self.basis.as_ref() != Some(&basis) {
            self.memory = Memory::default();
            self.basis = None;
        }
        pass.basis = Some(basis);
        pass.phase = Phase::Scanning;
    }

    fn take_page(&mut self, page: Page) {
        let Page { db, keys, found, fetched_at } = page;
        self.chunk = Some(Chunk { db, fetched_at, items: keys.into_iter().zip(found) });
    }

    /// Compares keys of the page in hand until a chunk of rows needs writing (or the page
    /// ends), writes them in one transaction, and remembers what committed. Returns whether
    /// rows were written.
    fn write_chunk(&mut self, writer: &mut KvWriter) -> Result<bool> {
        let (Some(pass), Some(chunk)) = (self.pass.as_mut(), self.chunk.as_mut()) else {
            return Ok(false);
        };
        let db = chunk.db;
        let number = pass.number;
        let mut rows = Vec::new();
        let mut routed_rows: Vec<RoutedRow> = Vec::new();
        let mut pending = Vec::new();
        let mut exhausted = true;
        let mut examined = 0;
        loop {
            if rows.len() + routed_rows.len() >= self.chunk_rows || examined >= KEYS_PER_TURN {
                // The rest of the page at the next turn.
                exhausted = false;
                break;
            }
            let Some((key, found)) = chunk.items.next() else { break };
            examined += 1;
            let (fingerprint, row) = match found {
                Found::Value { fingerprint, row } => (fingerprint, row),
                Found::Stream => {
                    pass.streams.push((db, key));
                    continue;
                }
                // Vanished meanwhile, or of a type not mirrored.
                Found::Gone | Found::Other => continue,
                Found::TooBig { ty, bytes } => {
                    pass.keys += 1;
                    let id = self.ids.id(db, &key);
                    skipped(&mut self.memory, id, db, &key, &ty, bytes, number);
                    continue;
                }
            };
            let id = self.ids.id(db, &key);
            if self.event_times.get(&id).is_some_and(|t| *t >= chunk.fetched_at) {
                // A notification synced this key after the page was fetched: the table is
                // newer than this value. Seen if it still exists; if it went, the deletion
                // check confirms that with Redis.
                if let Some(v) = self.memory.get_mut(&id) {
                    *v = pack(fingerprint_of(*v), number);
                    pass.keys += 1;
                }
                continue;
            }
            // One lookup per key: the memory of a million keys does not fit in a CPU cache,
            // so every lookup is a cache miss.
            let known = match self.memory.get_mut(&id) {
                Some(v) if pass.trusted && fingerprint_of(*v) == fingerprint => {
                    *v = pack(fingerprint, number);
                    pass.keys += 1;
                    continue;
                }
                Some(_) => true,
                None => false,
            };
            pass.keys += 1;
            match self.routes.destination(&key) {
                Destination::Generic => {
                    let mut row = row;
                    row.fill_text(&key);
                    rows.push(row);
                    pending.push((id, fingerprint));
                }
                // Its route cannot run now: the key waits (not remembered, so a later pass
                // writes it).
                Destination::Broken(_) => {}
                Destination::Route(route, parts) => {
                    match routed::route_cells(&route, &key, &parts, &row) {
                        Ok(cells) => routed_rows.push((route, cells, key, id, fingerprint, known)),
                        Err(why) => {
                            routed::report(&route.name, &key, &why);
                            pending.push((id, fingerprint));
                        }
                    }
                }
            }
        }
        if exhausted {
            self.chunk = None;
        }
        let mut refused = Vec::new();
        let t0 = Instant::now();
        let mut written = writer.upsert_isolating(db, &rows, &mut refused)?;
        let routed_count = routed_rows.len();
        written += self.write_routed(routed_rows, &mut pending);
        self.chunk_rows = next_chunk_rows(self.chunk_rows, rows.len() + routed_count, t0.elapsed());
        // Remembered below like the others, so an unchanged refused key is not tried (and
        // reported) again until it changes or a verifying pass comes.
        report_refused(db, &rows, &refused);
        // Only now, with the rows committed, does the memory vouch for them.
        let cap = self.pass.as_ref().map_or(0, |p| p.cap);
        let mut full = false;
        for (id, fingerprint) in pending {
            full |= !remember(&mut self.memory, cap, id, fingerprint, number);
        }
        if full {
            self.memory_full(cap);
        }
        if let Some(pass) = self.pass.as_mut() {
            pass.written += written;
        }
        if written > 0 {
            shmem::bump(|c| &c.key_values_processed, written as u64);
            let now = shmem::now();
            shmem::update(|st| st.last_sync_time = now);
        }
        Ok(!rows.is_empty())
    }

    /// Writes the keys of routes (each route's in one transaction); what committed, or was
    /// refused by its target (reported), goes to `pending` to be remembered. A route whose
    /// target fails is reported and its keys are not remembered (the next pass tries them
    /// again); the other routes and the key-value table go on. Returns the rows written.
    pub(super) fn write_routed(
        &mut self,
        rows: Vec<RoutedRow>,
        pending: &mut Vec<(KeyId, u64)>,
    ) -> usize {
        let mut written = 0;
        let mut groups: Vec<(std::sync::Arc<crate::routes::Route>, Vec<RoutedRow>)> = Vec::new();
        for r in rows {
            match groups.iter_mut().find(|(route, _)| route.name == r.0.name) {
                Some((_, g)) => g.push(r),
                None => groups.push((r.0.clone(), vec![r])),
            }
        }
        let pass = self.pass.as_ref().map_or(0, |p| p.number);
        // With the memory full, keys it cannot hold look new at every pass though their rows
        // are there: no COPY is tried that would only be rolled back.
        let full = self.pass.as_ref().is_none_or(|p| self.memory.len() >= p.cap);
        for (route, group) in groups {
            // Keys new to the worker go by COPY while the target takes them; the others, and
            // all of them once the target refused a COPY this pass, by the upsert.
            type Meta = (Vec<u8>, KeyId, u64);
            let split =
                |rows: Vec<RoutedRow>| -> (Vec<Meta>, Vec<Vec<crate::routes::mapping::Cell>>) {
                    rows.into_iter()
                        .map(|(_, cells, key, id, fp, _)| ((key, id, fp), cells))
                        .unzip()
                };
            let (fresh, known): (Vec<RoutedRow>, Vec<RoutedRow>) =
                group.into_iter().partition(|r| !r.5);
            let (mut fresh, fresh_cells) = split(fresh);
            let (mut upsert, mut cells) = split(known);
            let copied =
                if full { None } else { self.route_writers.copy_fresh(&route, &fresh_cells, pass) };
            if copied.is_none() {
                upsert.append(&mut fresh);
                cells.extend(fresh_cells);
            }
            let mut refused = Vec::new();
            match self.route_writers.upsert_isolating(&route, &cells, 0, &mut refused) {
                Ok(n) => {
                    let n = n + copied.unwrap_or(0);
                    written += n;
                    for (i, e) in &refused {
                        routed::report(&route.name, &upsert[*i].0, &e.to_string());
                    }
                    // (Keys not copied are among those upserted.)
                    if copied.is_some() {
                        pending.extend(fresh.iter().map(|r| (r.1, r.2)));
                    }
                    pending.extend(upsert.iter().map(|r| (r.1, r.2)));
                    let now = shmem::now();
                    shmem::update_route(&route.name, |s| {
                        if n > 0 {
                            s.rows_landed += n as i64;
                            s.last_landed = now;
                        }
                    });
                }
                Err(e) => {
                    self.route_writers.reset();
                    routed::failed(&route.name, &e.to_string());
                    if let Some(n) = copied {
                        // The keys copied are in the target: remembered as written.
                        written += n;
                        pending.extend(fresh.iter().map(|r| (r.1, r.2)));
                        let now = shmem::now();
                        shmem::update_route(&route.name, |s| {
                            s.rows_landed += n as i64;
                            s.last_landed = now;
                        });
                    }
                }
            }
        }
        written
    }

    /// Every SCAN is done. Redis must be the same server as at the start (a restart during
    /// the pass proves nothing about what is gone); when every key remembered from the last
    /// complete pass was seen again, nothing can be gone. Otherwise the deletion check
    /// starts. Returns the pass's summary when it ends here.
    fn scanned(&mut self, run_id: &str, s: &Settings) -> Option<PassSummary> {
        let pass = self.pass.as_mut()?;
        let number = pass.number;
        if pass.basis.as_ref().is_none_or(|b| b.run_id != run_id) {
            self.basis = None;
            return Some(self.close(s, false, 0));
        }
        let unseen = self.memory.values().filter(|v| pass_of(**v) != number).count();
        // With the memory full, keys the pass saw may not be in it: the table tells.
        let all_known = self.memory.len() < pass.cap;
        let generic = s.key_value_deletes != KeyValueDeletes::Ignore;
        let routes = self.routes.routes.iter().any(|r| r.deletes != crate::routes::Deletes::Ignore);
        let walk = (generic || routes) && !(pass.trusted && unseen == 0 && all_known);
        if !walk {
            return Some(self.close(s, true, 0));
        }
        pass.phase = Phase::Walking {
            // (The key-value table is not walked when its keys are never deleted.)
            db_index: if generic { 0 } else { s.db_search_range.len() },
            after: None,
            missing: Vec::new(),
            routes: RouteWalk::default(),
        };
        None
    }

    /// Reads the next chunk of the table's live keys (keyset pagination on the unique
    /// index) and notes those in scope that the pass did not see; when the walk is over,
    /// asks the scanner which of them are really gone.
    fn walk_live_chunk(&mut self, writer: &mut KvWriter, s: &Settings) -> Result<KvTurn> {
        let worked = KvTurn { worked: true, ..Default::default() };
        let Some(pass) = self.pass.as_ref() else { return Ok(worked) };
        let Phase::Walking { db_index, after, .. } = &pass.phase else { return Ok(worked) };
        let number = pass.number;
        if let Some(&db) = s.db_search_range.get(*db_index) {
            let names = writer.live_keys_chunk(db, after.as_deref(), CHECK_CHUNK)?;
            let mut found = Vec::new();
            for name in &names {
                // Only keys this pass was looking for: a key outside the patterns is not
                // "gone" (nor is a name this extension did not write, nor a key a route
                // takes now: its row here stays as it was).
                let Some(bytes) = decode_name(name) else { continue };
                if !pass.patterns.iter().any(|p| p.matches(&bytes)) {
                    continue;
                }
                if !matches!(self.routes.destination(&bytes), Destination::Generic) {
                    continue;
                }
                let id = self.ids.id(db, &bytes);
                if self.memory.get(&id).is_some_and(|v| pass_of(*v) == number) {
                    continue;
                }
                found.push((db, name.clone()));
            }
            if let Some(Phase::Walking { db_index, after, missing, .. }) =
                self.pass.as_mut().map(|p| &mut p.phase)
            {
                missing.extend(found);
                if (names.len() as i64) < CHECK_CHUNK {
                    *db_index += 1;
                    *after = None;
                } else {
                    *after = names.last().cloned();
                }
            }
            return Ok(worked);
        }
        if self.walk_route_chunk(s)? {
            return Ok(worked);
        }
        // The walk is over: ask about what is missing, a chunk at a time.
        let Some(pass) = self.pass.as_mut() else { return Ok(worked) };
        let Phase::Walking { missing, routes, .. } = &mut pass.phase else { return Ok(worked) };
        let missing = std::mem::take(missing);
        let mut routes = std::mem::take(routes);
        let mut outstanding = 0;
        let mut i = 0;
        while i < missing.len() {
            let db = missing[i].0;
            let names: Vec<String> = missing[i..]
                .iter()
                .take_while(|(d, _)| *d == db)
                .take(CONFIRM_CHUNK)
                .map(|(_, n)| n.clone())
                .collect();
            i += names.len();
            let Some(scanner) = self.scanner.as_mut() else {
                return Err(SyncError::ThreadStopped("scanner"));
            };
            scanner.confirm(&s.redis, db, names)?;
            routes.answers.push_back(false);
            outstanding += 1;
        }
        // A route's key is gone when no database of the range holds it.
        let route_names: Vec<String> = routes.missing.iter().map(|(_, k)| encode_name(k)).collect();
        for chunk in route_names.chunks(CONFIRM_CHUNK) {
            for &db in &s.db_search_range {
                let Some(scanner) = self.scanner.as_mut() else {
                    return Err(SyncError::ThreadStopped("scanner"));
                };
                scanner.confirm(&s.redis, db, chunk.to_vec())?;
                routes.answers.push_back(true);
                outstanding += 1;
            }
        }
        if outstanding == 0 {
            return Ok(KvTurn { finished: Some(self.close(s, true, 0)), ..worked });
        }
        pass.phase = Phase::Confirming { outstanding, gone: 0, routes };
        Ok(worked)
    }

    /// One chunk of the walk of the key routes' targets: their live rows' keys, those the
    /// pass did not see noted. Returns false once every target is walked.
    fn walk_route_chunk(&mut self, s: &Settings) -> Result<bool> {
        let Some(pass) = self.pass.as_ref() else { return Ok(false) };
        let Phase::Walking { routes: walk, .. } = &pass.phase else { return Ok(false) };
        let number = pass.number;
        let Some(route) = self.routes.routes.get(walk.index).cloned() else { return Ok(false) };
        if route.deletes == crate::routes::Deletes::Ignore {
            if let Some(Phase::Walking { routes: walk, .. }) =
                self.pass.as_mut().map(|p| &mut p.phase)
            {
                walk.index += 1;
                walk.after = None;
            }
            return Ok(true);
        }
        let rows = match self.route_writers.walk(&route, walk.after.as_deref(), CHECK_CHUNK) {
            Ok(rows) => rows,
            Err(e) => {
                // Its target cannot be read: no deletion found for it this pass.
                self.route_writers.reset();
                routed::failed(&route.name, &e.to_string());
                Vec::new()
            }
        };
        let mut missing = Vec::new();
        for values in &rows {
            let Some(key) = routed::key_of(&route, values) else { continue };
            let mine = matches!(self.routes.destination(&key), Destination::Route(r, _) if r.name == route.name);
            if !mine {
                continue;
            }
            let seen = s.db_search_range.iter().any(|db| {
                let id = self.ids.id(*db, &key);
                self.memory.get(&id).is_some_and(|v| pass_of(*v) == number)
            });
            if !seen {
                missing.push((walk.index, key));
            }
        }
        let full = rows.len() as i64 >= CHECK_CHUNK;
        let last = rows.last().cloned();
        if let Some(Phase::Walking { routes: walk, .. }) = self.pass.as_mut().map(|p| &mut p.phase)
        {
            walk.missing.extend(missing);
            if full {
                walk.after = last;
            } else {
                walk.index += 1;
                walk.after = None;
            }
        }
        Ok(true)
    }

    /// The scanner's answer about missing keys: a key that exists again (created after SCAN
    /// went past its slot) is not gone; the rest get the deletion policy.
    fn confirmed(
        &mut self,
        writer: &mut KvWriter,
        s: &Settings,
        db: u8,
        names: Vec<String>,
        types: Vec<String>,
    ) -> Result<Option<PassSummary>> {
        let Some(pass) = self.pass.as_mut() else { return Ok(None) };
        let number = pass.number;
        let route_answer = match &mut pass.phase {
            Phase::Confirming { routes, .. } => routes.answers.pop_front().unwrap_or(false),
            _ => false,
        };
        if route_answer {
            if let Phase::Confirming { routes, .. } = &mut pass.phase {
                for (name, ty) in names.iter().zip(&types) {
                    if ty == "hash" || ty == "string" {
                        routes.present.insert(decode_name(name).unwrap_or_default());
                    }
                }
            }
            return self.confirmation_done(s, 0);
        }
        let pass = &*pass;
        let mut really_gone = Vec::new();
        for (name, ty) in names.into_iter().zip(types) {
            if MIRRORED.contains(&ty.as_str()) {
                // Still there: remembered as seen, with a fingerprint nothing matches, so
                // the next pass compares it with the table (and a later deletion of it is
                // looked for).
                let key = decode_name(&name).unwrap_or_default();
                let id = self.ids.id(db, &key);
                remember(&mut self.memory, pass.cap, id, NO_FINGERPRINT, number);
            } else {
                // (A key that became a stream or another type not mirrored here is gone.)
                really_gone.push(name);
            }
        }
        let delete = s.key_value_deletes == KeyValueDeletes::Delete;
        let touched = writer.gone(db, &really_gone, delete)?;
        if touched > 0 {
            shmem::bump(|c| &c.key_values_processed, touched as u64);
        }
        self.confirmation_done(s, touched)
    }

    /// One answer of the scanner taken (`touched` rows by it); after the last, the keys of
    /// routes that no database holds get their route's `deletes`, and the pass ends.
    fn confirmation_done(&mut self, s: &Settings, touched: usize) -> Result<Option<PassSummary>> {
        let Some(Phase::Confirming { outstanding, gone, routes }) =
            self.pass.as_mut().map(|p| &mut p.phase)
        else {
            return Ok(None);
        };
        *gone += touched;
        *outstanding -= 1;
        if *outstanding > 0 {
            return Ok(None);
        }
        let generic = *gone;
        let mut routed_gone = 0;
        let walk = std::mem::take(routes);
        for (index, route) in self.routes.routes.clone().iter().enumerate() {
            let cells: Vec<Vec<crate::routes::mapping::Cell>> = walk
                .missing
                .iter()
                .filter(|(i, key)| *i == index && !walk.present.contains(key))
                .filter_map(|(_, key)| match self.routes.destination(key) {
                    Destination::Route(_, parts) => Some(routed::key_cells(route, key, &parts)),
                    _ => None,
                })
                .collect();
            match self.route_writers.gone(route, &cells) {
                Ok(n) => routed_gone += n,
                Err(e) => {
                    self.route_writers.reset();
                    routed::failed(&route.name, &e.to_string());
                }
            }
        }
        if routed_gone > 0 {
            shmem::bump(|c| &c.key_values_processed, routed_gone as u64);
        }
        Ok(Some(self.close(s, true, generic + routed_gone)))
    }

    fn close(&mut self, s: &Settings, complete: bool, gone: usize) -> PassSummary {
        self.chunk = None;
        let Some(pass) = self.pass.take() else { return PassSummary::default() };
        // A pass asked for while this one ran is still owed: it starts now.
        if !std::mem::take(&mut self.owed) {
            self.next_pass = pass.started + s.sync_interval;
        }
        shmem::bump(|c| &c.key_value_passes, 1);
        if complete {
            // Keys not seen are gone (or out of scope): forget them. The memory now holds
            // every live key of the table in scope.
            let number = pass.number;
            // The keys still skipped are noted on the same walk of the memory.
            let mut skipped = std::collections::HashSet::new();
            self.memory.retain(|id, v| {
                let keep = pass_of(*v) == number;
                if keep && fingerprint_of(*v) == TOO_BIG {
                    skipped.insert(id.pair());
                }
                keep
            });
            shmem::keep_skipped(|pair| skipped.contains(&pair), skipped.len());
            self.basis = pass.basis;
            if !pass.trusted {
                self.verified = Some(pass.started);
            }
            self.learned = Some(Learned { at: pass.started, streams: pass.streams });
        }
        PassSummary { keys: pass.keys, written: pass.written, gone, complete }
    }
}

impl KeySync {
    /// The memory is full: said once per worker run (passes go on, comparing the keys not
    /// remembered with the table).
    pub(super) fn memory_full(&mut self, cap: usize) {
        if !self.warned_full {
            self.warned_full = true;
            pgrx::warning!(
                "redis_pg_sync remembers at most {cap} keys (redis_sync.key_value_max_remembered): \
                 keys beyond that are compared with the key-value table at every pass"
            );
        }
    }
}

/// A key bigger than `key_value_max_size`: reported (log, `redis_sync_skipped_keys()`)
/// when first found so, remembered as seen so that the deletion check keeps its row (the
/// last value mirrored, if any).
pub(super) fn skipped(
    memory: &mut Memory,
    id: KeyId,
    db: u8,
    key: &[u8],
    ty: &str,
    bytes: u64,
    number: u16,
) {
    let known = memory.get(&id).is_some_and(|v| fingerprint_of(*v) == TOO_BIG);
    if !known {
        let name = encode_name(key);
        let shown: String = name.chars().take(200).collect();
        pgrx::warning!(
            "redis_pg_sync skips {ty} key \"{shown}\" of Redis database {db}: about {bytes} bytes, \
             more than redis_sync.key_value_max_size"
        );
        shmem::add_skipped(id.pair(), db, &name, ty, bytes);
    }
    // Kept even past `key_value_max_remembered` (they are few): reported once.
    memory.insert(id, pack(TOO_BIG, number));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn chunks_follow_the_cost_of_a_row() {
        // 1000 rows in 40 ms: 500 fit in 20 ms; halfway there at once.
        assert_eq!(next_chunk_rows(1000, 1000, Duration::from_millis(40)), 750);
        assert_eq!(next_chunk_rows(125, 125, Duration::from_millis(20)), 125);
        // Cheap rows: up to the most; a stall: down to the least, never to nothing.
        assert_eq!(next_chunk_rows(10_000, 10_000, Duration::from_micros(100)), 10_000);
        assert_eq!(next_chunk_rows(100, 100, Duration::from_secs(2)), 50);
        assert_eq!(next_chunk_rows(300, 0, Duration::ZERO), 300);
    }
}

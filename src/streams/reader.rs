//! A reader thread per Redis database in use: runs `XREADGROUP` (blocking in Redis when there
//! is nothing to read, so an idle worker sleeps) with the acknowledgements of committed
//! entries in the same round trip, and turns the reply into rows and COPY text while the main
//! thread writes the previous batch.
//!
//! Each owns its connection, takes its round trips from the stream lane's share of the rate
//! limit, talks to the main thread over bounded channels (and wakes it through the wake-up
//! pipe), has every signal blocked, and never calls Postgres.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use super::writer::StreamRow;
use crate::encode::{entry_id_millis, entry_json};
use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::pg::WakeHandle;
use crate::ratelimit::Lane;
use crate::redis::{Fields, GroupRead, RedisConn, SharedBudget};

/// Entries to acknowledge: stream key and IDs.
pub type Acks = Vec<(Vec<u8>, Vec<String>)>;

/// One stream in a read: its key, the ID to read after, and the name rows are stored under.
#[derive(Debug, Clone)]
pub struct ReadStream {
    pub key: Vec<u8>,
    pub after: String,
    pub stream_key: String,
    /// Named in `redis_sync.streams` (its group is created with MKSTREAM).
    pub configured: bool,
    /// The route its entries go to, when one matches: the rows are the route's columns.
    pub map: Option<std::sync::Arc<crate::routes::RowMap>>,
}

#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub settings: RedisSettings,
    pub db: u8,
    pub group: String,
    pub consumer: String,
    pub count: u32,
    pub block: Option<Duration>,
    /// May be empty: then only the acknowledgements are sent.
    pub streams: Vec<ReadStream>,
    /// Entries whose rows are committed, acknowledged in the same round trip as the read.
    pub acks: Acks,
    /// `redis_sync.auto_create_consumer_groups`: whether a missing group is created again.
    pub auto_create: bool,
    /// The stream lane's epoch when the request was made: a reply to an older epoch is
    /// dropped unread (its entries stay in our pending list and are read from there).
    pub epoch: u64,
}

/// What one stream gave: every entry ID (to acknowledge) and a row for each entry that
/// still has fields (an entry deleted while pending has none).
#[derive(Debug, Default)]
pub struct StreamBatch {
    pub key: Vec<u8>,
    pub ids: Vec<String>,
    pub rows: Vec<StreamRow>,
    /// The same rows in COPY text format: stream_key, message_id, data, timestamp.
    pub copy: Vec<u8>,
    /// Entries that came back without fields: deleted from the stream while pending.
    pub trimmed: usize,
}

/// What became of a stream's consumer group after the read found it missing.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupFix {
    /// Created again from the start of the stream.
    Recreated,
    /// It exists (another stream of the read was the one missing it).
    Exists,
    /// Missing, and `auto_create_consumer_groups` is off.
    Missing,
    /// The key is gone (a discovered stream deleted): no longer tracked.
    Gone,
    /// The key holds another type now (its `TYPE`): left out of reads.
    NotStream(String),
    /// It cannot be created for another reason (`NOPERM`, `OOM`): the error.
    Failed(String),
}

#[derive(Debug)]
pub enum ReadOutcome {
    Entries(Vec<StreamBatch>),
    /// The read met `NOGROUP` (a stream or its group disappeared): what was done about each
    /// stream of the request.
    Groups(Vec<(Vec<u8>, GroupFix)>),
    /// The read met `WRONGTYPE`: the keys of the request that are no longer streams, with
    /// their type now.
    NotStreams(Vec<(Vec<u8>, String)>),
}

pub struct ReadReply {
    pub request: ReadRequest,
    pub result: Result<ReadOutcome>,
}

/// The main thread's handle on a reader thread: one database's (whose reads block in Redis
/// when there is nothing to read), or the one that reads every busy database in one round
/// trip (which never blocks).
pub struct Reader {
    requests: SyncSender<Vec<ReadRequest>>,
    replies: Receiver<Vec<ReadReply>>,
    in_flight: bool,
    /// The reader connection's `CLIENT ID` (0 until known), to end a blocked read early.
    client_id: Arc<AtomicU64>,
}

impl Reader {
    /// A reader whose connection has database `home` selected.
    pub fn start(name: &str, home: u8, budget: SharedBudget, wake: WakeHandle) -> Result<Reader> {
        // One request and one reply at most: memory stays at two reads per reader.
        let (req_tx, req_rx) = sync_channel::<Vec<ReadRequest>>(1);
        let (rep_tx, rep_rx) = sync_channel::<Vec<ReadReply>>(1);
        let client_id = Arc::new(AtomicU64::new(0));
        let id = client_id.clone();
        crate::worker::spawn_helper(&format!("redis_pg_sync {name}"), move || {
            serve(home, req_rx, rep_tx, budget, wake, id)
        })
        .map_err(|e| SyncError::Config(format!("cannot start a reader thread: {e}")))?;
        Ok(Reader { requests: req_tx, replies: rep_rx, in_flight: false, client_id })
    }

    /// The `CLIENT ID` of a read under way, when known.
    pub fn blocked_client(&self) -> Option<u64> {
        let id = self.client_id.load(Ordering::Relaxed);
        (self.in_flight && id != 0).then_some(id)
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Sends reads of one or more databases (those of several go in one round trip and may
    /// not block).
    pub fn send(&mut self, reqs: Vec<ReadRequest>) -> Result<()> {
        self.requests.send(reqs).map_err(|_| SyncError::ThreadStopped("reader"))?;
        self.in_flight = true;
        Ok(())
    }

    /// The replies to the reads in flight, if they have come.
    pub fn try_receive(&mut self) -> Result<Option<Vec<ReadReply>>> {
        match self.replies.try_recv() {
            Ok(r) => {
                self.in_flight = false;
                Ok(Some(r))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => {
                self.in_flight = false;
                Err(SyncError::ThreadStopped("reader"))
            }
        }
    }
}

fn serve(
    home: u8,
    requests: Receiver<Vec<ReadRequest>>,
    replies: SyncSender<Vec<ReadReply>>,
    budget: SharedBudget,
    wake: WakeHandle,
    client_id: Arc<AtomicU64>,
) {
    let mut conn: Option<(RedisSettings, RedisConn)> = None;
    for reqs in requests {
        let out = read(home, &mut conn, reqs, &client_id);
        if out.iter().any(|r| r.result.as_ref().is_err_and(|e| e.connection_lost())) {
            conn = None;
        }
        if replies.send(out).is_err() {
            return;
        }
        wake.wake();
        // The round trip is paid for after it is made, before the next one: a read that
        // waits in Redis costs Redis nothing until an entry ends it, so it starts at once
        // and an entry is never kept waiting for a token. Over time it is still one token
        // per round trip (a reader runs ahead by one at most).
        budget.take(Lane::Streams);
    }
}

fn read(
    home: u8,
    conn: &mut Option<(RedisSettings, RedisConn)>,
    reqs: Vec<ReadRequest>,
    client_id: &AtomicU64,
) -> Vec<ReadReply> {
    let Some(settings) = reqs.first().map(|r| r.settings.clone()) else { return Vec::new() };
    if conn.as_ref().is_none_or(|(s, _)| *s != settings) {
        *conn = None;
        client_id.store(0, Ordering::Relaxed);
        match RedisConn::connect_fast(&settings, home) {
            Ok(mut c) => {
                client_id.store(c.client_id().unwrap_or(0), Ordering::Relaxed);
                *conn = Some((settings, c));
            }
            Err(e) => {
                return reqs
                    .into_iter()
                    .map(|request| ReadReply { request, result: Err(e.clone()) })
                    .collect()
            }
        }
    }
    let Some((_, c)) = conn.as_mut() else { return Vec::new() };
    if reqs.len() == 1 && reqs[0].db == home {
        return reqs
            .into_iter()
            .map(|request| {
                let result = read_one(c, &request);
                ReadReply { request, result }
            })
            .collect();
    }
    let outcomes = {
        let parts: Vec<GroupRead<'_>> = reqs
            .iter()
            .map(|r| GroupRead {
                db: r.db,
                group: &r.group,
                consumer: &r.consumer,
                count: r.count,
                streams: r.streams.iter().map(|s| (s.key.as_slice(), s.after.as_str())).collect(),
                acks: &r.acks,
            })
            .collect();
        c.read_groups(home, &parts)
    };
    match outcomes {
        Err(e) => {
            reqs.into_iter().map(|request| ReadReply { request, result: Err(e.clone()) }).collect()
        }
        Ok(outcomes) => reqs
            .into_iter()
            .zip(outcomes)
            .map(|(request, outcome)| {
                let result = match outcome {
                    Ok(reply) => Ok(ReadOutcome::Entries(batches(&request, reply))),
                    Err(e) if e.is_nogroup() || e.is_wrong_type() => {
                        // Looked into on this connection, in the part's database.
                        let fixed =
                            c.select(request.db).and_then(|()| after_error(c, &request, &e));
                        let back = c.select(home);
                        fixed.and_then(|f| back.map(|()| f))
                    }
                    Err(e) => Err(e),
                };
                ReadReply { request, result }
            })
            .collect(),
    }
}

/// One read on the reader's own database (it may block).
fn read_one(c: &mut RedisConn, req: &ReadRequest) -> Result<ReadOutcome> {
    let pairs: Vec<(&[u8], &str)> =
        req.streams.iter().map(|s| (s.key.as_slice(), s.after.as_str())).collect();
    match c.read_group(&req.group, &req.consumer, req.count, req.block, &pairs, &req.acks) {
        Ok(reply) => Ok(ReadOutcome::Entries(batches(req, reply))),
        Err(e) if e.is_nogroup() || e.is_wrong_type() => after_error(c, req, &e),
        Err(e) => Err(e),
    }
}

/// A read failed for one of its streams: `NOGROUP` (a stream or its group disappeared)
/// gets the groups made again; `WRONGTYPE` names the keys that are no longer streams, so
/// that they alone are left out and the others read on.
fn after_error(c: &mut RedisConn, req: &ReadRequest, e: &SyncError) -> Result<ReadOutcome> {
    if e.is_nogroup() {
        return fix_groups(c, req).map(ReadOutcome::Groups);
    }
    let keys: Vec<&[u8]> = req.streams.iter().map(|s| s.key.as_slice()).collect();
    let types = c.types(&keys)?;
    Ok(ReadOutcome::NotStreams(
        req.streams
            .iter()
            .zip(types)
            .filter(|(_, t)| t != "stream")
            .map(|(s, t)| (s.key.clone(), t))
            .collect(),
    ))
}

/// The `TYPE` of `key`; `None` when Redis will not say (an ACL user without `type`): only a
/// lost connection is an error.
fn key_type(c: &mut RedisConn, key: &[u8]) -> Result<Option<String>> {
    match c.types(&[key]) {
        Ok(mut types) => Ok(types.pop()),
        Err(e) if e.connection_lost() => Err(e),
        Err(_) => Ok(None),
    }
}

/// A stream or its group disappeared under the read: every stream of the request gets its
/// group again (from the start) where that is allowed and possible. A key deleted and set
/// again as another type (a blocked read is told `UNBLOCKED` at the `DEL`) is named by its
/// type, so that it alone is left out of reads; a lost connection is the lane's error.
fn fix_groups(c: &mut RedisConn, req: &ReadRequest) -> Result<Vec<(Vec<u8>, GroupFix)>> {
    let mut fixes = Vec::with_capacity(req.streams.len());
    for s in &req.streams {
        let tried = if req.auto_create {
            c.create_group(&s.key, &req.group, s.configured).map(|made| {
                if made {
                    GroupFix::Recreated
                } else {
                    GroupFix::Exists
                }
            })
        } else {
            c.group_exists(&s.key, &req.group).map(|exists| {
                if exists {
                    GroupFix::Exists
                } else {
                    GroupFix::Missing
                }
            })
        };
        let fix = match tried {
            Ok(GroupFix::Missing) => match key_type(c, &s.key)? {
                // (Asked about a group only: the key may be gone or of another type.)
                Some(ty) if ty == "none" && !s.configured => GroupFix::Gone,
                Some(ty) if ty != "none" && ty != "stream" => GroupFix::NotStream(ty),
                _ => GroupFix::Missing,
            },
            Ok(fix) => fix,
            Err(e) if e.connection_lost() => return Err(e),
            Err(e) => match key_type(c, &s.key)?.as_deref() {
                Some("none") if !s.configured => GroupFix::Gone,
                Some("none") | Some("stream") | None => GroupFix::Failed(e.to_string()),
                Some(other) => GroupFix::NotStream(other.to_string()),
            },
        };
        fixes.push((s.key.clone(), fix));
    }
    Ok(fixes)
}

fn batches(req: &ReadRequest, reply: crate::redis::StreamEntries) -> Vec<StreamBatch> {
    reply
        .into_iter()
        .map(|(key, entries)| {
            let asked = req.streams.iter().find(|s| s.key == key);
            let stream_key: Arc<str> = Arc::from(asked.map_or("", |s| s.stream_key.as_str()));
            let map = asked.and_then(|s| s.map.clone());
            let mut batch =
                StreamBatch { ids: Vec::with_capacity(entries.len()), ..Default::default() };
            batch.rows.reserve(entries.len());
            // (Room for rows of a few short fields, so that a read's text is seldom moved.)
            batch.copy.reserve(entries.len() * 96);
            for e in entries {
                if let Some(fields) = e.fields {
                    let millis = entry_id_millis(&e.id).unwrap_or(0);
                    // A route's row keeps its fields (its COPY text is written from them), the
                    // stream table's row its JSON text.
                    let (data, fields) = if map.is_some() {
                        (String::new(), fields)
                    } else {
                        (entry_json(&fields.pairs()), Fields::default())
                    };
                    let row = StreamRow {
                        stream_key: stream_key.clone(),
                        message_id: e.id.clone(),
                        data,
                        millis,
                        map: map.clone(),
                        fields,
                    };
                    row.push_copy(&mut batch.copy);
                    batch.rows.push(row);
                } else {
                    batch.trimmed += 1;
                }
                batch.ids.push(e.id);
            }
            batch.key = key;
            batch
        })
        .collect()
}

/// The COPY text of `rows`.
pub fn copy_text(rows: &[StreamRow]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rows {
        r.push_copy(&mut out);
    }
    out
}

/// Ends the reads now blocked in Redis (on the readers' connections) at once, from a
/// short-lived thread of its own: after a pause, a change of mode or of what is synced, no
/// read keeps taking entries for up to `poll_interval`. Best effort.
pub fn unblock(settings: &RedisSettings, ids: Vec<u64>) {
    if ids.is_empty() {
        return;
    }
    let settings = settings.clone();
    let _ = crate::worker::spawn_helper("redis_pg_sync unblock", move || {
        if let Ok(mut c) = RedisConn::connect(&settings, settings.db) {
            c.unblock(&ids);
        }
    });
}

//! The reader thread: runs `XREADGROUP` and turns the reply into rows while the main thread
//! writes the previous batch into Postgres (two cores, two halves of the work).
//!
//! It owns its own Redis connections, talks to the main thread over bounded channels, has
//! every signal blocked, and never calls Postgres: only the atomics of `shmem::bump`.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use super::writer::StreamRow;
use crate::encode::{entry_id_millis, entry_json, push_copy_field, push_utc_millis};
use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::redis::RedisConn;

/// Entries to acknowledge: stream key and IDs.
pub type Acks = Vec<(Vec<u8>, Vec<String>)>;

/// One stream in a read: its key, the ID to read after, and the name rows are stored under.
#[derive(Debug, Clone)]
pub struct ReadStream {
    pub key: Vec<u8>,
    pub after: String,
    pub stream_key: String,
}

#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub settings: RedisSettings,
    pub db: u8,
    pub group: String,
    pub consumer: String,
    pub count: u32,
    pub block: Option<Duration>,
    pub streams: Vec<ReadStream>,
    /// Entries whose rows are committed, acknowledged in the same round trip as the read.
    pub acks: Acks,
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
}

pub struct ReadReply {
    pub request: ReadRequest,
    pub result: Result<Vec<StreamBatch>>,
}

pub struct Reader {
    requests: SyncSender<ReadRequest>,
    replies: Receiver<ReadReply>,
    _thread: JoinHandle<()>,
    in_flight: usize,
}

impl Reader {
    pub fn start() -> Result<Reader> {
        // One request queued and one reply waiting at most: memory stays at two batches.
        let (req_tx, req_rx) = sync_channel::<ReadRequest>(1);
        let (rep_tx, rep_rx) = sync_channel::<ReadReply>(1);
        let thread =
            crate::worker::spawn_helper("redis_pg_sync reader", move || serve(req_rx, rep_tx))
                .map_err(|e| SyncError::Config(format!("cannot start the reader thread: {e}")))?;
        Ok(Reader { requests: req_tx, replies: rep_rx, _thread: thread, in_flight: 0 })
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight > 0
    }

    pub fn send(&mut self, req: ReadRequest) -> Result<()> {
        self.requests.send(req).map_err(|_| SyncError::ThreadStopped("reader"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Waits for the reply to the oldest request, calling `tick` every 100 ms meanwhile
    /// (the worker checks for interrupts there).
    pub fn receive(&mut self, tick: &dyn Fn()) -> Result<ReadReply> {
        loop {
            match self.replies.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => {
                    self.in_flight -= 1;
                    return Ok(r);
                }
                Err(RecvTimeoutError::Timeout) => tick(),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SyncError::ThreadStopped("reader"))
                }
            }
        }
    }

    /// Waits for and drops every reply still due (after a failure, what was read sits in
    /// our pending list and is read again from there).
    pub fn discard(&mut self, tick: &dyn Fn()) {
        while self.in_flight > 0 {
            if self.receive(tick).is_err() {
                self.in_flight = 0;
            }
        }
    }
}

fn serve(requests: Receiver<ReadRequest>, replies: SyncSender<ReadReply>) {
    let mut conns: HashMap<u8, (RedisSettings, RedisConn)> = HashMap::new();
    for req in requests {
        let result = read(&mut conns, &req);
        if result.as_ref().is_err_and(|e| e.connection_lost()) {
            conns.remove(&req.db);
        }
        if replies.send(ReadReply { request: req, result }).is_err() {
            return;
        }
    }
}

fn read(
    conns: &mut HashMap<u8, (RedisSettings, RedisConn)>,
    req: &ReadRequest,
) -> Result<Vec<StreamBatch>> {
    let stale = conns.get(&req.db).is_some_and(|(s, _)| *s != req.settings);
    if stale || !conns.contains_key(&req.db) {
        conns.remove(&req.db);
        let c = RedisConn::connect(&req.settings, req.db)?;
        conns.insert(req.db, (req.settings.clone(), c));
    }
    let Some((_, conn)) = conns.get_mut(&req.db) else {
        return Err(SyncError::Config("no reader connection".into()));
    };
    let pairs: Vec<(&[u8], &str)> =
        req.streams.iter().map(|s| (s.key.as_slice(), s.after.as_str())).collect();
    let reply =
        conn.read_group(&req.group, &req.consumer, req.count, req.block, &pairs, &req.acks)?;
    let names: HashMap<&[u8], &str> =
        req.streams.iter().map(|s| (s.key.as_slice(), s.stream_key.as_str())).collect();
    Ok(reply
        .into_iter()
        .map(|(key, entries)| {
            let stream_key = names.get(key.as_slice()).copied().unwrap_or("");
            let mut batch =
                StreamBatch { ids: Vec::with_capacity(entries.len()), ..Default::default() };
            for e in entries {
                if let Some(fields) = &e.fields {
                    let row = StreamRow {
                        stream_key: stream_key.to_owned(),
                        message_id: e.id.clone(),
                        data: entry_json(fields),
                        millis: entry_id_millis(&e.id).unwrap_or(0),
                    };
                    push_copy_row(&mut batch.copy, &row);
                    batch.rows.push(row);
                }
                batch.ids.push(e.id);
            }
            batch.key = key;
            batch
        })
        .collect())
}

fn push_copy_row(out: &mut Vec<u8>, row: &StreamRow) {
    push_copy_field(out, &row.stream_key);
    out.push(b'\t');
    push_copy_field(out, &row.message_id);
    out.push(b'\t');
    push_copy_field(out, &row.data);
    out.push(b'\t');
    push_utc_millis(out, row.millis);
    out.push(b'\n');
}

//! Keyspace notifications: when Redis publishes them (`notify-keyspace-events` with `K` and
//! the event classes), a thread subscribed to `__keyspace@<db>__:*` passes every changed
//! key to the main thread, which syncs it at once. The scan pass stays the safety net for
//! anything missed (a notification is fire-and-forget; a full queue drops events).
//!
//! Like the reader, the thread has every signal blocked and never calls Postgres.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;
use crate::redis::open_connection;

/// Changed keys waiting for the main thread, at most.
const QUEUE: usize = 65_536;

/// Do these `notify-keyspace-events` flags publish key changes on the keyspace channel?
pub fn flags_cover_changes(flags: &str) -> bool {
    let has = |c| flags.contains(c);
    has('K') && (has('A') || (has('$') && has('g')))
}

/// `__keyspace@3__:some:key` -> (3, b"some:key").
pub fn parse_channel(channel: &[u8]) -> Option<(u8, Vec<u8>)> {
    let rest = channel.strip_prefix(b"__keyspace@")?;
    let at = rest.iter().position(|&b| b == b'_')?;
    let db: u8 = std::str::from_utf8(&rest[..at]).ok()?.parse().ok()?;
    let key = rest[at..].strip_prefix(b"__:")?;
    Some((db, key.to_vec()))
}

pub struct Notifier {
    events: Receiver<(u8, Vec<u8>)>,
    stop: Arc<AtomicBool>,
    /// Set by the thread when the queue was full and events were dropped.
    pub overflowed: Arc<AtomicBool>,
    held: Option<(u8, Vec<u8>)>,
    pub settings: RedisSettings,
    pub dbs: Vec<u8>,
    _thread: JoinHandle<()>,
}

impl Notifier {
    pub fn start(settings: &RedisSettings, dbs: &[u8]) -> Result<Notifier> {
        let (tx, rx) = sync_channel(QUEUE);
        let (ready_tx, ready_rx) = sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let overflowed = Arc::new(AtomicBool::new(false));
        let (s, d, st, ov) = (settings.clone(), dbs.to_vec(), stop.clone(), overflowed.clone());
        let thread = crate::worker::spawn_helper("redis_pg_sync notifications", move || {
            listen(s, d, tx, ready_tx, st, ov)
        })
        .map_err(|e| SyncError::Config(format!("cannot start the notification thread: {e}")))?;
        // Subscribed before we say so (it retries by itself if Redis is not there now).
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        Ok(Notifier {
            events: rx,
            stop,
            overflowed,
            held: None,
            settings: settings.clone(),
            dbs: dbs.to_vec(),
            _thread: thread,
        })
    }

    /// Waits up to `timeout` for a changed key; keeps it for the next `drain`.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        if self.held.is_some() {
            return true;
        }
        match self.events.recv_timeout(timeout) {
            Ok(e) => {
                self.held = Some(e);
                true
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Up to `max` changed keys, oldest first.
    pub fn drain(&mut self, max: usize) -> Vec<(u8, Vec<u8>)> {
        let mut out: Vec<(u8, Vec<u8>)> = self.held.take().into_iter().collect();
        while out.len() < max {
            match self.events.try_recv() {
                Ok(e) => out.push(e),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn listen(
    settings: RedisSettings,
    dbs: Vec<u8>,
    tx: SyncSender<(u8, Vec<u8>)>,
    ready: SyncSender<()>,
    stop: Arc<AtomicBool>,
    overflowed: Arc<AtomicBool>,
) {
    let mut delay = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = open_connection(&settings, settings.db) else {
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(10));
            continue;
        };
        let mut pubsub = conn.as_pubsub();
        let subscribed =
            dbs.iter().all(|db| pubsub.psubscribe(format!("__keyspace@{db}__:*")).is_ok())
                && pubsub.set_read_timeout(Some(Duration::from_millis(500))).is_ok();
        if !subscribed {
            std::thread::sleep(delay);
            continue;
        }
        delay = Duration::from_millis(100);
        // Anything changed while we were not subscribed: the worker runs a pass now.
        overflowed.store(true, Ordering::Relaxed);
        let _ = ready.try_send(());
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    let Some(event) =
                        msg.get_channel::<Vec<u8>>().ok().and_then(|c| parse_channel(&c))
                    else {
                        continue;
                    };
                    match tx.try_send(event) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => overflowed.store(true, Ordering::Relaxed),
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels() {
        assert_eq!(parse_channel(b"__keyspace@0__:user:1"), Some((0, b"user:1".to_vec())));
        assert_eq!(parse_channel(b"__keyspace@12__:a__:b"), Some((12, b"a__:b".to_vec())));
        assert_eq!(parse_channel(b"__keyspace@12__:\xff"), Some((12, vec![0xff])));
        assert_eq!(parse_channel(b"__keyevent@0__:set"), None);
    }

    #[test]
    fn flags() {
        assert!(flags_cover_changes("KA"));
        assert!(flags_cover_changes("AKE"));
        assert!(flags_cover_changes("Kg$lshzxe"));
        assert!(!flags_cover_changes("EA"));
        assert!(!flags_cover_changes(""));
        assert!(!flags_cover_changes("Kx"));
    }
}

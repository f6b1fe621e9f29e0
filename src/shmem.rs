//! Worker state and counters in shared memory: written by the worker, read by the SQL
//! functions in any backend.
//!
//! Counters are atomics (a Redis I/O thread may bump them); the rest sits behind one LWLock
//! and is only touched from a process's main thread.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic};

/// Set in `_PG_init` when loaded through `shared_preload_libraries`; inherited by every
/// backend the postmaster forks. False means the shared state below does not exist.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum WorkerState {
    Starting,
    Connecting,
    Running,
    BackingOff,
    Paused,
    Monitoring,
    Standby,
    Stopped,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Connecting => "connecting",
            WorkerState::Running => "running",
            WorkerState::BackingOff => "backing_off",
            WorkerState::Paused => "paused",
            WorkerState::Monitoring => "monitoring",
            WorkerState::Standby => "standby",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// A fixed-size string that can live in shared memory. Longer text is cut at a character
/// boundary.
#[derive(Clone, Copy)]
pub struct FixedStr<const N: usize> {
    len: u16,
    bytes: [u8; N],
}

impl<const N: usize> FixedStr<N> {
    pub const fn empty() -> Self {
        FixedStr { len: 0, bytes: [0; N] }
    }

    pub fn set(&mut self, s: &str) {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        self.len = end as u16;
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

#[derive(Clone, Copy)]
pub struct WorkerStatus {
    pub pid: i32,
    pub state: WorkerState,
    pub mode: crate::gucs::Mode,
    pub redis_connected: bool,
    pub redis_server: FixedStr<256>,
    pub streams_tracked: i64,
    /// TimestampTz values; 0 = never.
    pub last_sync_time: i64,
    pub last_error: FixedStr<1024>,
    pub last_error_time: i64,
    pub started_at: i64,
    /// Per lane (in the order of `ratelimit::Lane::ALL`).
    pub lanes: [LaneSlot; 3],
    /// Rows in the dead-letter table, as the worker last counted and since added.
    pub dead_letters_stored: i64,
    /// The key-value worker process (the fields above are the stream worker's, but for its
    /// lane's row in `lanes`).
    pub kv: ProcessSlot,
    /// Landed entries whose acknowledgement waits for a flush (here, or on the standbys),
    /// and when the oldest of them committed (TimestampTz; 0 = none waits).
    pub acks_waiting: i64,
    pub acks_waiting_since: i64,
    /// Stream workers past the first (`redis_sync.workers`); the fields above are the
    /// first's.
    pub more: [ProcessSlot; crate::gucs::MAX_STREAM_WORKERS - 1],
    /// A Redis Cluster's primaries as last learnt (`host:port`, comma-separated).
    pub redis_nodes: FixedStr<512>,
}

/// A worker process other than the stream worker, for `redis_sync_workers()`.
#[derive(Clone, Copy)]
pub struct ProcessSlot {
    pub pid: i32,
    pub state: WorkerState,
    pub started_at: i64,
    /// Streams it tracks (a stream worker past the first).
    pub streams: i64,
}

impl ProcessSlot {
    pub const STOPPED: ProcessSlot =
        ProcessSlot { pid: 0, state: WorkerState::Stopped, started_at: 0, streams: 0 };
}

/// The shared-memory stream slots of stream worker `index` of `workers`: an equal part each.
pub fn stream_slots(index: u8, workers: u8) -> std::ops::Range<usize> {
    let n = usize::from(workers.max(1));
    let k = usize::from(index).min(n - 1);
    (k * MAX_STREAM_SLOTS / n)..((k + 1) * MAX_STREAM_SLOTS / n)
}

/// What one lane is doing, for `redis_sync_lanes()`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum LaneState {
    /// Turned off by the settings (or the mode).
    Off,
    /// Nothing to do right now (a read waits in Redis, the next pass is not due).
    Idle,
    Running,
    /// The last try failed; waiting before the next (`last_error` says why).
    BackingOff,
    /// Waiting for Redis to be reachable again.
    Waiting,
}

impl LaneState {
    pub fn as_str(self) -> &'static str {
        match self {
            LaneState::Off => "off",
            LaneState::Idle => "idle",
            LaneState::Running => "running",
            LaneState::BackingOff => "backing_off",
            LaneState::Waiting => "waiting_for_redis",
        }
    }
}

#[derive(Clone, Copy)]
pub struct LaneSlot {
    pub state: LaneState,
    /// TimestampTz values; 0 = never.
    pub last_success: i64,
    pub last_error: FixedStr<512>,
    pub last_error_time: i64,
}

impl LaneSlot {
    pub const EMPTY: LaneSlot = LaneSlot {
        state: LaneState::Off,
        last_success: 0,
        last_error: FixedStr::empty(),
        last_error_time: 0,
    };
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            pid: 0,
            state: WorkerState::Stopped,
            mode: crate::gucs::Mode::Sync,
            redis_connected: false,
            redis_server: FixedStr::empty(),
            streams_tracked: 0,
            last_sync_time: 0,
            last_error: FixedStr::empty(),
            last_error_time: 0,
            started_at: 0,
            lanes: [LaneSlot::EMPTY; 3],
            dead_letters_stored: 0,
            kv: ProcessSlot::STOPPED,
            acks_waiting: 0,
            acks_waiting_since: 0,
            more: [ProcessSlot::STOPPED; crate::gucs::MAX_STREAM_WORKERS - 1],
            redis_nodes: FixedStr::empty(),
        }
    }
}

// SAFETY: plain Copy data with no pointers, valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for WorkerStatus {}

/// The metrics of the Python service, under the same names.
#[derive(Default)]
pub struct Counters {
    pub messages_processed: AtomicU64,
    pub key_values_processed: AtomicU64,
    pub redis_ops: AtomicU64,
    pub pg_ops: AtomicU64,
    pub streams_discovered: AtomicU64,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Complete key-value passes.
    pub key_value_passes: AtomicU64,
    /// Stream entries deleted upstream while pending, so never stored.
    pub entries_lost: AtomicU64,
    /// Bumped when a transaction that changed `redis_sync.routes` commits: the workers load
    /// the routes again when it moves.
    pub routes_generation: AtomicU64,
}

// SAFETY: atomics only, valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for Counters {}

// SAFETY: the name is static and unique to this extension; the lock is initialised by
// pg_shmem_init! in _PG_init before any use.
pub static STATUS: PgLwLock<WorkerStatus> = unsafe { PgLwLock::new(c"redis_pg_sync_status") };
// SAFETY: as for STATUS.
pub static COUNTERS: PgAtomic<Counters> = unsafe { PgAtomic::new(c"redis_pg_sync_counters") };

/// Requests the shared memory; only valid while the library is being preloaded.
pub fn init() {
    pg_shmem_init!(STATUS);
    pg_shmem_init!(COUNTERS);
    pg_shmem_init!(STREAMS);
    pg_shmem_init!(SKIPPED);
    pg_shmem_init!(LEARNED);
    pg_shmem_init!(BUDGET);
    pg_shmem_init!(ROUTES);
    PRELOADED.store(true, Ordering::Relaxed);
}

/// Bumps a counter. Safe from any thread.
pub fn bump(counter: fn(&Counters) -> &AtomicU64, by: u64) {
    if preloaded() {
        counter(COUNTERS.get()).fetch_add(by, Ordering::Relaxed);
    }
}

pub fn now() -> i64 {
    // SAFETY: reads the clock; no state of Postgres is touched.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Runs `f` on the status under the exclusive lock (main thread only).
pub fn update(f: impl FnOnce(&mut WorkerStatus)) {
    if preloaded() {
        f(&mut STATUS.exclusive());
    }
}

/// Records an error for `last_error`, counts it.
pub fn record_error(message: &str) {
    bump(|c| &c.errors, 1);
    let t = now();
    update(|s| {
        s.last_error.set(message);
        s.last_error_time = t;
    });
}

pub fn snapshot() -> Option<WorkerStatus> {
    preloaded().then(|| *STATUS.share())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_lock_held_by_a_dead_process_is_taken_over() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id() as i32;
        child.wait().expect("wait");
        let owner = AtomicI32::new(dead);
        {
            let _held = lock_budget(&owner);
            assert_eq!(owner.load(Ordering::Relaxed), std::process::id() as i32);
        }
        // Released on drop, and free to take again.
        assert_eq!(owner.load(Ordering::Relaxed), 0);
        drop(lock_budget(&owner));
        assert_eq!(owner.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn fixed_str_cuts_at_char_boundary() {
        let mut f = FixedStr::<5>::empty();
        f.set("abcdé");
        assert_eq!(f.as_str(), "abcd");
        f.set("xy");
        assert_eq!(f.as_str(), "xy");
    }
}

/// How many streams `redis_sync_streams()` can describe. The worker tracks more if there
/// are more; the rest are counted in `streams_tracked` but not listed.
pub const MAX_STREAM_SLOTS: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum StreamState {
    Active,
    /// The consumer group is missing and `auto_create_consumer_groups` is off.
    NoGroup,
    Error,
    /// Monitor mode: watched, not synced.
    Monitored,
}

impl StreamState {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Active => "active",
            StreamState::NoGroup => "waiting_for_group",
            StreamState::Error => "error",
            StreamState::Monitored => "monitored",
        }
    }
}

#[derive(Clone, Copy)]
pub struct StreamSlot {
    pub used: bool,
    pub key: FixedStr<256>,
    pub db: u8,
    pub state: StreamState,
    pub consumer_group: FixedStr<128>,
    pub last_id: FixedStr<48>,
    pub messages_synced: i64,
    pub pending: i64,
    /// -1 = unknown
    pub lag: i64,
    pub length: i64,
    pub first_entry_id: FixedStr<48>,
    pub last_entry_id: FixedStr<48>,
    pub consumers: i64,
    pub groups: i64,
    pub last_sync_time: i64,
    pub last_error: FixedStr<256>,
    /// Monitor mode's verdict ("" = healthy or not judged).
    pub health: FixedStr<256>,
    /// Entries deleted from the stream while pending.
    pub entries_lost: i64,
    /// Set by the discovery pass numbered `found_gen` / that first found it (`added_gen`).
    pub found_gen: u64,
    pub added_gen: u64,
}

impl StreamSlot {
    /// Takes in what XINFO said about the stream.
    pub fn set_info(&mut self, info: &crate::redis::StreamInfo) {
        self.pending = info.pending;
        self.lag = info.lag.unwrap_or(-1);
        self.length = info.length;
        self.first_entry_id.set(info.first_entry_id.as_deref().unwrap_or(""));
        self.last_entry_id.set(info.last_entry_id.as_deref().unwrap_or(""));
        self.consumers = info.consumers;
        self.groups = info.groups;
    }

    pub const EMPTY: StreamSlot = StreamSlot {
        used: false,
        key: FixedStr::empty(),
        db: 0,
        state: StreamState::Active,
        consumer_group: FixedStr::empty(),
        last_id: FixedStr::empty(),
        messages_synced: 0,
        pending: 0,
        lag: -1,
        length: 0,
        first_entry_id: FixedStr::empty(),
        last_entry_id: FixedStr::empty(),
        consumers: 0,
        groups: 0,
        last_sync_time: 0,
        last_error: FixedStr::empty(),
        health: FixedStr::empty(),
        entries_lost: 0,
        found_gen: 0,
        added_gen: 0,
    };
}

#[derive(Clone, Copy)]
pub struct StreamTable {
    pub slots: [StreamSlot; MAX_STREAM_SLOTS],
    /// Discovery passes finished, by stream worker; a slot's `found_gen` is its worker's.
    pub discovery_gen: [u64; crate::gucs::MAX_STREAM_WORKERS],
    /// Discovery passes requested by `redis_sync_discover()`.
    pub discovery_requested: u64,
    /// Requests answered, by stream worker: its last discovery finished after all requests
    /// up to this one.
    pub discovery_answered: [u64; crate::gucs::MAX_STREAM_WORKERS],
}

impl Default for StreamTable {
    fn default() -> Self {
        StreamTable {
            slots: [StreamSlot::EMPTY; MAX_STREAM_SLOTS],
            discovery_gen: [0; crate::gucs::MAX_STREAM_WORKERS],
            discovery_requested: 0,
            discovery_answered: [0; crate::gucs::MAX_STREAM_WORKERS],
        }
    }
}

// SAFETY: plain Copy data with no pointers.
unsafe impl PGRXSharedMemory for StreamTable {}

// SAFETY: as for STATUS.
pub static STREAMS: PgLwLock<StreamTable> = unsafe { PgLwLock::new(c"redis_pg_sync_streams") };

/// Runs `f` on the stream table under the exclusive lock (main thread only).
pub fn update_streams(f: impl FnOnce(&mut StreamTable)) {
    if preloaded() {
        f(&mut STREAMS.exclusive());
    }
}

/// How many `redis_sync_discover()` requests this stream worker's discoveries answered.
pub fn discovery_answered() -> u64 {
    let k = usize::from(crate::gucs::stream_worker());
    if preloaded() {
        STREAMS.share().discovery_answered.get(k).copied().unwrap_or(0)
    } else {
        0
    }
}

/// How many discovery passes `redis_sync_discover()` has asked for.
pub fn discovery_requests() -> u64 {
    if preloaded() {
        STREAMS.share().discovery_requested
    } else {
        0
    }
}

/// How many skipped keys `redis_sync_skipped_keys()` can list; more are counted.
pub const MAX_SKIPPED: usize = 64;

/// A key too big to mirror.
#[derive(Clone, Copy)]
pub struct SkippedKey {
    pub used: bool,
    /// The worker's id of the key (its database and full name, hashed).
    pub id: (u64, u64),
    pub db: u8,
    /// As stored in the key-value table (encoded), cut to fit.
    pub key: FixedStr<256>,
    pub value_type: FixedStr<16>,
    /// As Redis measured it (`MEMORY USAGE`, `STRLEN`, or what was read before stopping).
    pub bytes: i64,
    pub skipped_at: i64,
}

impl SkippedKey {
    pub const EMPTY: SkippedKey = SkippedKey {
        used: false,
        id: (0, 0),
        db: 0,
        key: FixedStr::empty(),
        value_type: FixedStr::empty(),
        bytes: 0,
        skipped_at: 0,
    };
}

#[derive(Clone, Copy)]
pub struct SkippedKeys {
    pub slots: [SkippedKey; MAX_SKIPPED],
    /// Keys skipped now, listed or not.
    pub count: i64,
}

impl Default for SkippedKeys {
    fn default() -> Self {
        SkippedKeys { slots: [SkippedKey::EMPTY; MAX_SKIPPED], count: 0 }
    }
}

// SAFETY: plain Copy data with no pointers.
unsafe impl PGRXSharedMemory for SkippedKeys {}

// SAFETY: as for STATUS.
pub static SKIPPED: PgLwLock<SkippedKeys> = unsafe { PgLwLock::new(c"redis_pg_sync_skipped") };

/// Lists a key as skipped, too big (main thread only): in its own slot, a free one, or
/// the oldest.
pub fn add_skipped(id: (u64, u64), db: u8, key: &str, value_type: &str, bytes: u64) {
    if !preloaded() {
        return;
    }
    let t = now();
    let mut table = SKIPPED.exclusive();
    let at = table.slots.iter().position(|s| s.used && s.id == id);
    if at.is_none() {
        table.count += 1;
    }
    let oldest = (0..MAX_SKIPPED).min_by_key(|&i| table.slots[i].skipped_at).unwrap_or(0);
    let slot = at.or_else(|| table.slots.iter().position(|s| !s.used)).unwrap_or(oldest);
    let s = &mut table.slots[slot];
    *s = SkippedKey { used: true, id, db, skipped_at: t, ..SkippedKey::EMPTY };
    s.key.set(key);
    s.value_type.set(value_type);
    s.bytes = bytes.min(i64::MAX as u64) as i64;
}

/// Drops the listed keys that `still` says are no longer skipped; `count` is how many are.
pub fn keep_skipped(still: impl Fn((u64, u64)) -> bool, count: usize) {
    if !preloaded() {
        return;
    }
    let mut table = SKIPPED.exclusive();
    for s in table.slots.iter_mut() {
        if s.used && !still(s.id) {
            *s = SkippedKey::EMPTY;
        }
    }
    table.count = count as i64;
}

/// Forgets every skipped key (the worker starts over).
pub fn clear_skipped() {
    if preloaded() {
        *SKIPPED.exclusive() = SkippedKeys::default();
    }
}

/// A stream key: its database and name.
pub type StreamKey = (u8, Vec<u8>);

/// How many stream keys a key-value pass can hand to discovery; a pass that saw more (or a
/// longer name) hands over none, and discovery walks the keyspace itself.
pub const MAX_LEARNED: usize = MAX_STREAM_SLOTS;

/// The stream keys the last complete key-value pass saw, handed from the key-value worker
/// to the stream worker's discovery.
#[derive(Clone, Copy)]
pub struct LearnedStreams {
    /// Bumped at every hand-over.
    pub generation: u64,
    /// None handed over (no complete pass yet, or too many to list).
    pub none: bool,
    /// When the pass started (CLOCK_MONOTONIC, the same clock in every process).
    pub pass_started: Option<std::time::Instant>,
    pub count: usize,
    pub keys: [(u8, FixedStr<256>); MAX_LEARNED],
}

impl Default for LearnedStreams {
    fn default() -> Self {
        LearnedStreams {
            generation: 0,
            none: true,
            pass_started: None,
            count: 0,
            keys: [(0, FixedStr::empty()); MAX_LEARNED],
        }
    }
}

// SAFETY: plain Copy data with no pointers.
unsafe impl PGRXSharedMemory for LearnedStreams {}

// SAFETY: as for STATUS.
pub static LEARNED: PgLwLock<LearnedStreams> = unsafe { PgLwLock::new(c"redis_pg_sync_learned") };

/// Hands the stream keys of a complete pass (`None`: forget the last ones) to discovery
/// (main thread only). Keys that are not UTF-8 or longer than a slot, or more of them than
/// fit, hand over nothing: discovery then walks the keyspace itself.
pub fn hand_over_learned(learned: Option<(std::time::Instant, &[StreamKey])>) {
    if !preloaded() {
        return;
    }
    let mut t = LEARNED.exclusive();
    t.generation += 1;
    t.none = true;
    t.count = 0;
    let Some((started, keys)) = learned else { return };
    if keys.len() > MAX_LEARNED {
        return;
    }
    for (i, (db, key)) in keys.iter().enumerate() {
        let Ok(text) = std::str::from_utf8(key) else { return };
        if text.len() > 256 {
            return;
        }
        t.keys[i].0 = *db;
        t.keys[i].1.set(text);
    }
    t.count = keys.len();
    t.pass_started = Some(started);
    t.none = false;
}

/// The generation of the last hand-over of stream keys.
pub fn learned_generation() -> u64 {
    if preloaded() {
        LEARNED.share().generation
    } else {
        0
    }
}

/// The stream keys last handed over, and when their pass started.
pub fn learned() -> Option<(std::time::Instant, Vec<StreamKey>)> {
    if !preloaded() {
        return None;
    }
    let t = LEARNED.share();
    let started = t.pass_started.filter(|_| !t.none)?;
    let keys = t.keys[..t.count].iter().map(|(db, k)| (*db, k.as_str().as_bytes().to_vec()));
    Some((started, keys.collect()))
}

/// `redis_sync.rate_limit`'s buckets, shared by every worker process's lanes.
#[derive(Default)]
pub struct BudgetCell {
    /// The PID of the process whose thread holds the lock; 0 when free.
    owner: AtomicI32,
    budget: UnsafeCell<Option<crate::ratelimit::Budget>>,
}

// SAFETY: `budget` is only touched while `owner` holds the lock (in `with_budget`).
unsafe impl Sync for BudgetCell {}
// SAFETY: an atomic and plain Copy data with no pointers (an Instant is a CLOCK_MONOTONIC
// reading, the same clock in every process).
unsafe impl PGRXSharedMemory for BudgetCell {}

// SAFETY: as for STATUS.
pub static BUDGET: PgAtomic<BudgetCell> = unsafe { PgAtomic::new(c"redis_pg_sync_budget") };

/// Releases the budget's lock when dropped (also when `f` panics).
struct Held<'a>(&'a AtomicI32);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

/// Takes the budget's lock. A holder that has died (a worker process that exited while one
/// of its threads held it) is taken over, so the lock cannot stay held.
fn lock_budget(owner: &AtomicI32) -> Held<'_> {
    let me = std::process::id() as i32;
    let mut spins = 0u32;
    loop {
        match owner.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return Held(owner),
            Err(holder) => {
                spins += 1;
                if spins.is_multiple_of(64) && holder != me && !process_alive(holder) {
                    let taken =
                        owner.compare_exchange(holder, me, Ordering::Acquire, Ordering::Relaxed);
                    if taken.is_ok() {
                        return Held(owner);
                    }
                }
                if spins < 16 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Runs `f` on the shared buckets (made at `rate` on first use), under a lock held only for
/// the few arithmetic steps of `f`. Any thread may call it; gives `f` back when the shared
/// memory does not exist (not preloaded).
pub fn with_budget<R, F>(rate: u32, f: F) -> Result<R, F>
where
    F: FnOnce(&mut crate::ratelimit::Budget) -> R,
{
    if !preloaded() {
        return Err(f);
    }
    let cell = BUDGET.get();
    let _held = lock_budget(&cell.owner);
    // SAFETY: the lock is held until `_held` drops, so no other thread or process touches
    // the cell meanwhile; `f` is arithmetic only and cannot block.
    let budget = unsafe { &mut *cell.budget.get() };
    let b = budget
        .get_or_insert_with(|| crate::ratelimit::Budget::new(rate, std::time::Instant::now()));
    Ok(f(b))
}

/// How many routes there may be (`redis_sync_add_*_route` refuses more).
pub const MAX_ROUTES: usize = 64;

/// One route's figures, for `redis_sync_routes()`.
#[derive(Clone, Copy)]
pub struct RouteSlot {
    pub used: bool,
    /// Stream routes (written by the stream worker) or key routes (the key-value worker).
    pub keys: bool,
    pub name: FixedStr<64>,
    pub rows_landed: i64,
    pub dead_letters: i64,
    /// TimestampTz values; 0 = never.
    pub last_landed: i64,
    pub last_error: FixedStr<512>,
    pub last_error_time: i64,
}

impl RouteSlot {
    pub const EMPTY: RouteSlot = RouteSlot {
        used: false,
        keys: false,
        name: FixedStr::empty(),
        rows_landed: 0,
        dead_letters: 0,
        last_landed: 0,
        last_error: FixedStr::empty(),
        last_error_time: 0,
    };
}

#[derive(Clone, Copy)]
pub struct RouteTable {
    pub slots: [RouteSlot; MAX_ROUTES],
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable { slots: [RouteSlot::EMPTY; MAX_ROUTES] }
    }
}

// SAFETY: plain Copy data with no pointers.
unsafe impl PGRXSharedMemory for RouteTable {}

// SAFETY: as for STATUS.
pub static ROUTES: PgLwLock<RouteTable> = unsafe { PgLwLock::new(c"redis_pg_sync_routes") };

/// The routes' generation (0 where the shared memory does not exist).
pub fn routes_generation() -> u64 {
    if preloaded() {
        COUNTERS.get().routes_generation.load(Ordering::Relaxed)
    } else {
        0
    }
}

/// Says that the routes changed (any backend, after its commit), and wakes every worker to
/// load them.
pub fn bump_routes_generation() {
    bump(|c| &c.routes_generation, 1);
    if let Some(s) = snapshot() {
        crate::pg::wake_backend(s.pid);
        crate::pg::wake_backend(s.kv.pid);
        for m in &s.more {
            crate::pg::wake_backend(m.pid);
        }
    }
}

/// Keeps a slot for each route of `names`, stream routes or key routes (`keys`): the
/// figures of those already listed stay; the slots of that kind's other routes are freed.
pub fn keep_routes(keys: bool, names: &[String]) {
    if !preloaded() {
        return;
    }
    let mut table = ROUTES.exclusive();
    for s in table.slots.iter_mut() {
        if s.used && s.keys == keys && !names.iter().any(|n| n == s.name.as_str()) {
            *s = RouteSlot::EMPTY;
        }
    }
    for n in names {
        if table.slots.iter().any(|s| s.used && s.keys == keys && s.name.as_str() == n) {
            continue;
        }
        if let Some(s) = table.slots.iter_mut().find(|s| !s.used) {
            *s = RouteSlot { used: true, keys, ..RouteSlot::EMPTY };
            s.name.set(n);
        }
    }
}

/// Runs `f` on the slot of route `name`, when it has one (main thread only).
pub fn update_route(name: &str, f: impl FnOnce(&mut RouteSlot)) {
    if !preloaded() {
        return;
    }
    let mut table = ROUTES.exclusive();
    if let Some(s) = table.slots.iter_mut().find(|s| s.used && s.name.as_str() == name) {
        f(s);
    }
}

/// The route slots now in use.
pub fn route_slots() -> Vec<RouteSlot> {
    if !preloaded() {
        return Vec::new();
    }
    ROUTES.share().slots.iter().filter(|s| s.used).copied().collect()
}

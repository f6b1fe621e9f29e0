//! Redis Cluster as the source: one connection that speaks to a whole cluster as if it were
//! one server, so everything above it (discovery, reads, acknowledgements, key-value passes)
//! runs unchanged. It learns which primary serves which hash slot (`CLUSTER SLOTS`), sends
//! each command to the primary of its key's slot (a pipeline is split per primary, one
//! round trip each, and the replies put back in order), follows `MOVED` (the slot map is
//! read again: a resharding or a failover moved the slot), `ASK` (the command is sent once
//! more to the node named, after `ASKING`) and waits out `TRYAGAIN`.
//!
//! Three kinds of command need more than a key's slot:
//! - `XREADGROUP` over streams of several slots is sent as one read per slot (Redis refuses
//!   a multi-key command across slots) and the replies are joined. Such reads never block in
//!   Redis (a blocking read covers one slot only, and a blocked read could not be ended from
//!   another connection on the right node): an empty read waits here for a short while
//!   instead, so an idle worker neither spins nor waits long.
//! - `SCAN` walks every primary in turn: the cursor handed back carries the primary's place
//!   in the list in its top byte (a primary's own cursor stays far below it).
//! - Commands without a key (`PING`, `INFO`, `CONFIG`, `CLIENT`) go to the first primary.
//!
//! Only database 0 exists in a cluster.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use ::redis::{ConnectionLike, RedisError, RedisResult, Value};

use super::conn::RedisConn;
use crate::error::{Result, SyncError};
use crate::gucs::RedisSettings;

/// A node's address as `CLUSTER SLOTS` gives it.
pub type Addr = (String, u16);

const SLOTS: u16 = 16384;
/// Redirections followed for one command before its last error is the answer.
const REDIRECTS: usize = 5;
/// How long an empty read of the cluster waits before it answers (in place of `BLOCK`).
pub const IDLE_READ_WAIT: Duration = Duration::from_millis(100);
/// A cluster SCAN cursor: the primary's place in the sorted list (top 8 bits), a 16-bit
/// check of its address (so a cursor is never continued on another node after a failover
/// reordered the list), and the primary's own cursor (40 bits: a table of up to 2^40
/// buckets).
const CURSOR_SHIFT: u32 = 56;
const CHECK_SHIFT: u32 = 40;
const CURSOR_MASK: u64 = (1 << CHECK_SHIFT) - 1;

/// The 16-bit check of a node's address in a SCAN cursor (FNV-1a).
fn address_check((host, port): &Addr) -> u64 {
    let mut h: u32 = 0x811c_9dc5;
    for b in host.bytes().chain(port.to_be_bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    u64::from(h & 0xffff)
}

/// The cursor that goes on with `cursor` (0: from its start) on the primary at `node`.
fn cluster_cursor(node: usize, addr: &Addr, cursor: u64) -> u64 {
    ((node as u64) << CURSOR_SHIFT) | (address_check(addr) << CHECK_SHIFT) | (cursor & CURSOR_MASK)
}

/// The primaries this process last learnt, for `redis_sync_status().redis_nodes`.
static NODES: Mutex<String> = Mutex::new(String::new());

/// The cluster's primaries as last learnt (`host:port`, comma-separated; empty when the
/// source is a single server).
pub fn nodes_seen() -> String {
    NODES.lock().map(|n| n.clone()).unwrap_or_default()
}

/// The hash slot of `key`: CRC16 of the key, or of its hash tag (the part between the
/// first `{` and the next `}`, when not empty), modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0), the cluster's key hash.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// Which primary serves which slots.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Topology {
    /// (first slot, last slot, index in `primaries`), sorted by first slot.
    ranges: Vec<(u16, u16, usize)>,
    /// Sorted, each once.
    primaries: Vec<Addr>,
}

impl Topology {
    /// Reads a `CLUSTER SLOTS` reply; `asked` stands for a node that gives its address as
    /// empty (it does not know it).
    pub fn parse(reply: &Value, asked: &str) -> Option<Topology> {
        let Value::Array(items) = reply else { return None };
        let mut found: Vec<(u16, u16, Addr)> = Vec::new();
        for item in items {
            let Value::Array(parts) = item else { return None };
            let start = u16::try_from(int(parts.first()?)?).ok()?;
            let end = u16::try_from(int(parts.get(1)?)?).ok()?;
            let Value::Array(node) = parts.get(2)? else { return None };
            // No endpoint (NULL or empty): the node asked. `?`: an endpoint it does not
            // know, so no one can be sent there (its slots count as unserved).
            let host = match node.first()? {
                Value::Nil => String::new(),
                v => text(v)?,
            };
            if host == "?" {
                continue;
            }
            let port = u16::try_from(int(node.get(1)?)?).ok()?;
            let host = if host.is_empty() { asked.to_owned() } else { host };
            found.push((start, end, (host, port)));
        }
        let mut primaries: Vec<Addr> = found.iter().map(|(_, _, a)| a.clone()).collect();
        primaries.sort();
        primaries.dedup();
        let mut ranges: Vec<(u16, u16, usize)> = found
            .into_iter()
            .filter_map(|(s, e, a)| primaries.binary_search(&a).ok().map(|i| (s, e, i)))
            .collect();
        ranges.sort();
        Some(Topology { ranges, primaries })
    }

    /// The primary serving `slot`, if any does.
    pub fn node_of(&self, slot: u16) -> Option<&Addr> {
        let i = self.ranges.partition_point(|(start, _, _)| *start <= slot);
        let (_, end, node) = self.ranges.get(i.checked_sub(1)?)?;
        (slot <= *end).then(|| &self.primaries[*node])
    }

    pub fn primaries(&self) -> &[Addr] {
        &self.primaries
    }

    /// `host:port` of every primary, comma-separated.
    pub fn describe(&self) -> String {
        self.primaries.iter().map(|(h, p)| format!("{h}:{p}")).collect::<Vec<_>>().join(",")
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The seed nodes of `redis_host`: `host[:port]` separated by commas, the port
/// `redis_port` where none is given. (An IPv6 address with a port is written `[addr]:port`.)
pub fn parse_seeds(hosts: &str, default_port: u16) -> std::result::Result<Vec<Addr>, String> {
    let mut seeds = Vec::new();
    for part in hosts.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (host, port) = if let Some(rest) = part.strip_prefix('[') {
            let (host, after) =
                rest.split_once(']').ok_or_else(|| format!("\"{part}\": no closing ]"))?;
            match after.strip_prefix(':') {
                Some(port) => (host, port),
                None if after.is_empty() => (host, ""),
                None => return Err(format!("\"{part}\": expected [address]:port")),
            }
        } else if part.matches(':').count() == 1 {
            part.split_once(':').unwrap_or((part, ""))
        } else {
            (part, "")
        };
        let port =
            match port {
                "" => default_port,
                p => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!("\"{part}\": the port must be a number from 1 to 65535")
                })?,
            };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("\"{part}\": no host, or blanks in it"));
        }
        seeds.push((host.to_owned(), port));
    }
    if seeds.is_empty() {
        return Err("no host given".into());
    }
    Ok(seeds)
}

/// A command as its arguments.
type Args = Vec<Vec<u8>>;

/// Splits a packed pipeline back into its commands (arrays of bulk strings, as the client
/// library packs them).
fn split_packed(mut b: &[u8]) -> Option<Vec<Args>> {
    fn number(b: &[u8]) -> Option<(usize, &[u8])> {
        let end = b.iter().position(|&c| c == b'\r')?;
        let n = std::str::from_utf8(&b[..end]).ok()?.parse().ok()?;
        Some((n, b.get(end + 2..)?))
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let (n, rest) = number(b.strip_prefix(b"*")?)?;
        b = rest;
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            let (len, rest) = number(b.strip_prefix(b"$")?)?;
            args.push(rest.get(..len)?.to_vec());
            b = rest.get(len + 2..)?;
        }
        out.push(args);
    }
    Some(out)
}

fn pack_into(out: &mut Vec<u8>, args: &[Vec<u8>]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn is(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

/// Where a command without special handling goes: its key's slot, or (no key) any primary.
fn slot_of(args: &[Vec<u8>]) -> Option<u16> {
    let name = args.first()?;
    let keyless = [
        "PING",
        "INFO",
        "CONFIG",
        "CLIENT",
        "SELECT",
        "CLUSTER",
        "ASKING",
        "DBSIZE",
        "TIME",
        "COMMAND",
        "AUTH",
        "HELLO",
        "ECHO",
        "READONLY",
        "READWRITE",
    ];
    if keyless.iter().any(|k| is(name, k)) {
        return None;
    }
    let at =
        if ["XINFO", "XGROUP", "OBJECT", "MEMORY"].iter().any(|k| is(name, k)) { 2 } else { 1 };
    args.get(at).map(|k| key_slot(k))
}

/// The parts of an `XREADGROUP`: the arguments before the keys (without `BLOCK`), the
/// block time asked for, and the keys and IDs.
struct Read {
    head: Args,
    block: Option<Duration>,
    keys: Args,
    ids: Args,
}

fn parse_read(args: &[Vec<u8>]) -> Option<Read> {
    let mut head: Args = args.get(..4)?.to_vec();
    let mut block = None;
    let mut i = 4;
    loop {
        let a = args.get(i)?;
        if is(a, "STREAMS") {
            head.push(a.clone());
            i += 1;
            break;
        }
        if is(a, "BLOCK") {
            let ms: u64 = std::str::from_utf8(args.get(i + 1)?).ok()?.parse().ok()?;
            block = Some(Duration::from_millis(ms));
            i += 2;
            continue;
        }
        let takes_value = is(a, "COUNT") || is(a, "CLAIM");
        head.extend(args.get(i..i + if takes_value { 2 } else { 1 })?.iter().cloned());
        i += if takes_value { 2 } else { 1 };
    }
    let rest = args.get(i..)?;
    if rest.is_empty() || rest.len() % 2 != 0 {
        return None;
    }
    let (keys, ids) = rest.split_at(rest.len() / 2);
    Some(Read { head, block, keys: keys.to_vec(), ids: ids.to_vec() })
}

/// How one command of the caller's pipeline is sent.
enum Plan {
    /// As it is (one part).
    One,
    /// An `XREADGROUP` sent as one read per slot; the replies are joined. With a block
    /// time, an empty result waits (at most [`IDLE_READ_WAIT`]).
    Read { block: Option<Duration> },
    /// A `SCAN` of the primary at this place in the list (and the next one's address, if
    /// any); the reply's cursor is made ours.
    Scan { node: usize, addr: Addr, next: Option<Addr> },
    /// Sent to every primary (`CONFIG GET`): their reply when they all agree, an empty one
    /// (nothing known) when they differ.
    Every,
    /// Answered here, without a round trip.
    Done(Value),
}

/// One command as sent to one node.
struct Part {
    /// The caller's command it belongs to.
    of: usize,
    args: Args,
    slot: Option<u16>,
    /// Sent to this node rather than the slot's primary (a SCAN's node, an ASK).
    to: Option<Addr>,
    asking: bool,
    reply: Option<Value>,
    /// The last redirection or TRYAGAIN met, the answer if no node takes the command.
    last: Option<Value>,
}

/// The connection to a cluster (see the module's text).
pub struct ClusterLink {
    settings: RedisSettings,
    seeds: Vec<Addr>,
    topology: Topology,
    conns: BTreeMap<Addr, RedisConn>,
    read_timeout: Option<Duration>,
    /// A node could not be reached: the slot map is read again before the next command
    /// (a primary that died is replaced by its replica once the cluster fails it over).
    stale: bool,
}

impl ClusterLink {
    /// Learns the slot map from the first seed that answers.
    pub fn connect(settings: &RedisSettings, db: u8) -> Result<ClusterLink> {
        if db != 0 {
            return Err(SyncError::Config(format!(
                "Redis Cluster has database 0 only; database {db} cannot be used"
            )));
        }
        let seeds = parse_seeds(&settings.host, settings.port)
            .map_err(|e| SyncError::Config(format!("redis_sync.redis_host: {e}")))?;
        let mut link = ClusterLink {
            settings: settings.clone(),
            seeds,
            topology: Topology::default(),
            conns: BTreeMap::new(),
            read_timeout: None,
            stale: false,
        };
        link.refresh()?;
        Ok(link)
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    fn node_settings(&self, (host, port): &Addr) -> RedisSettings {
        RedisSettings { host: host.clone(), port: *port, cluster: false, ..self.settings.clone() }
    }

    fn conn(&mut self, addr: &Addr) -> Result<&mut RedisConn> {
        if !self.conns.contains_key(addr) {
            let mut c = RedisConn::connect_fast(&self.node_settings(addr), 0)?;
            if let Some(t) = self.read_timeout {
                c.conn.set_read_timeout(Some(t)).map_err(|e| unavailable(addr, &e.to_string()))?;
            }
            self.conns.insert(addr.clone(), c);
        }
        self.conns.get_mut(addr).ok_or_else(|| unavailable(addr, "no connection"))
    }

    /// Reads the slot map again: from a primary known, else from a seed.
    pub fn refresh(&mut self) -> Result<()> {
        let mut candidates: Vec<Addr> = self.topology.primaries.clone();
        candidates.extend(self.seeds.iter().cloned());
        let mut last = None;
        for addr in candidates {
            let reply = match self.conn(&addr) {
                Ok(c) => {
                    super::count_round_trip();
                    ::redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(&mut c.conn)
                }
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match reply {
                Ok(v) => match Topology::parse(&v, &addr.0) {
                    Some(t) if !t.primaries.is_empty() => {
                        self.stale = false;
                        self.set_topology(t);
                        return Ok(());
                    }
                    _ => last = Some(unavailable(&addr, "CLUSTER SLOTS: no slots served")),
                },
                Err(e) => {
                    self.conns.remove(&addr);
                    last = Some(if e.code().is_some() {
                        // Not a cluster node ("ERR This instance has cluster support disabled").
                        SyncError::Config(format!(
                            "redis_sync.redis_cluster is on, but {}:{} answered CLUSTER SLOTS with: {e}",
                            addr.0, addr.1
                        ))
                    } else {
                        unavailable(&addr, &e.to_string())
                    });
                }
            }
        }
        Err(last
            .unwrap_or_else(|| SyncError::Config("redis_sync.redis_host: no host given".into())))
    }

    fn set_topology(&mut self, t: Topology) {
        if let Ok(mut n) = NODES.lock() {
            *n = t.describe();
        }
        // Connections to nodes no longer primaries (a demoted primary) are closed.
        self.conns.retain(|a, _| t.primaries.contains(a));
        self.topology = t;
    }

    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> RedisResult<()> {
        self.read_timeout = t;
        for c in self.conns.values_mut() {
            c.conn.set_read_timeout(t)?;
        }
        Ok(())
    }

    /// Turns the caller's commands into parts, each for one node.
    fn plan(&self, commands: Vec<Args>) -> RedisResult<(Vec<Plan>, Vec<Part>)> {
        let mut plans = Vec::with_capacity(commands.len());
        let mut parts = Vec::with_capacity(commands.len());
        let part = |of, args, slot, to| Part {
            of,
            args,
            slot,
            to,
            asking: false,
            reply: None,
            last: None,
        };
        for (of, args) in commands.into_iter().enumerate() {
            let name = args.first().cloned().unwrap_or_default();
            if is(&name, "XREADGROUP") {
                if let Some(read) = parse_read(&args) {
                    // One read per slot, the streams in the order given.
                    let mut by_slot: Vec<(u16, Args, Args)> = Vec::new();
                    for (k, id) in read.keys.into_iter().zip(read.ids) {
                        let slot = key_slot(&k);
                        match by_slot.iter_mut().find(|(s, _, _)| *s == slot) {
                            Some((_, keys, ids)) => {
                                keys.push(k);
                                ids.push(id);
                            }
                            None => by_slot.push((slot, vec![k], vec![id])),
                        }
                    }
                    for (slot, keys, ids) in by_slot {
                        let mut a = read.head.clone();
                        a.extend(keys);
                        a.extend(ids);
                        parts.push(part(of, a, Some(slot), None));
                    }
                    plans.push(Plan::Read { block: read.block });
                    continue;
                }
            }
            if is(&name, "SCAN") {
                let cursor: Option<u64> =
                    args.get(1).and_then(|c| std::str::from_utf8(c).ok()?.parse().ok());
                if let Some(cursor) = cursor {
                    let node = (cursor >> CURSOR_SHIFT) as usize;
                    let primaries = &self.topology.primaries;
                    let addr = primaries.get(node).filter(|a| {
                        cursor == 0 || (cursor >> CHECK_SHIFT) & 0xffff == address_check(a)
                    });
                    let Some(addr) = addr else {
                        // The primaries changed during the walk (a failover, a resharding):
                        // the cursor means nothing on the node now at its place. The caller
                        // starts its scan again (a pass cut short marks nothing).
                        return Err(io_error("the primaries changed during a SCAN"));
                    };
                    let mut a = args.clone();
                    a[1] = (cursor & CURSOR_MASK).to_string().into_bytes();
                    parts.push(part(of, a, None, Some(addr.clone())));
                    let next = primaries.get(node + 1).cloned();
                    plans.push(Plan::Scan { node, addr: addr.clone(), next });
                    continue;
                }
            }
            if is(&name, "CONFIG") && args.get(1).is_some_and(|a| is(a, "GET")) {
                for addr in &self.topology.primaries {
                    parts.push(part(of, args.clone(), None, Some(addr.clone())));
                }
                plans.push(Plan::Every);
                continue;
            }
            if is(&name, "SELECT") && args.get(1).is_some_and(|d| d.as_slice() == b"0") {
                plans.push(Plan::Done(Value::Okay));
                continue;
            }
            let slot = slot_of(&args);
            parts.push(part(of, args, slot, None));
            plans.push(Plan::One);
        }
        Ok((plans, parts))
    }

    fn target(&self, p: &Part) -> Option<Addr> {
        if let Some(to) = &p.to {
            return Some(to.clone());
        }
        match p.slot {
            Some(slot) => self.topology.node_of(slot).cloned(),
            None => self.topology.primaries.first().cloned(),
        }
    }

    /// Sends every part to its node, following redirections.
    fn send(&mut self, parts: &mut [Part]) -> RedisResult<()> {
        // The caller counted one round trip (and took one token of the rate limit); each
        // further node is one more.
        let mut counted = true;
        for round in 0..=REDIRECTS {
            let mut by_node: BTreeMap<Addr, Vec<usize>> = BTreeMap::new();
            for (i, p) in parts.iter_mut().enumerate() {
                if p.reply.is_some() {
                    continue;
                }
                let mut target = self.target(p);
                if target.is_none() {
                    // No primary serves the slot in the map known: read it again.
                    self.refresh().map_err(|e| io_error(&e.to_string()))?;
                    target = self.target(p);
                }
                match target {
                    Some(addr) => by_node.entry(addr).or_default().push(i),
                    // The cluster is down for the slot: the worker tries again later.
                    None => {
                        return Err(io_error(&format!(
                            "no primary serves hash slot {}",
                            p.slot.unwrap_or_default()
                        )))
                    }
                }
            }
            if by_node.is_empty() {
                return Ok(());
            }
            let mut refresh = false;
            let mut wait = false;
            for (addr, idx) in by_node {
                let mut packed = Vec::new();
                let mut count = 0;
                for &i in &idx {
                    if parts[i].asking {
                        pack_into(&mut packed, &[b"ASKING".to_vec()]);
                        count += 1;
                    }
                    pack_into(&mut packed, &parts[i].args);
                    count += 1;
                }
                let conn = match self.conn(&addr) {
                    Ok(c) => c,
                    Err(e) => {
                        self.stale = true;
                        return Err(io_error(&e.to_string()));
                    }
                };
                if !counted {
                    super::count_round_trip();
                }
                counted = false;
                let replies = match conn.conn.req_packed_commands(&packed, 0, count) {
                    Ok(r) => r,
                    Err(e) => {
                        // What was sent may have run: no retry; the caller tries again.
                        self.conns.remove(&addr);
                        self.stale = true;
                        return Err(e);
                    }
                };
                conn.last_check = std::time::Instant::now();
                let mut replies = replies.into_iter();
                for &i in &idx {
                    let p = &mut parts[i];
                    if p.asking {
                        replies.next();
                    }
                    let r = replies.next().unwrap_or(Value::Nil);
                    p.asking = false;
                    // An ASK's node is for one try; a SCAN stays with its node.
                    if p.slot.is_some() {
                        p.to = None;
                    }
                    match redirection(&r, &addr) {
                        Some(Redirect::Moved(to)) => {
                            // Sent where the reply says; the map is read again for the rest.
                            refresh = true;
                            p.to = to;
                            p.last = Some(r);
                        }
                        Some(Redirect::Ask(to)) => {
                            p.to = Some(to);
                            p.asking = true;
                            p.last = Some(r);
                        }
                        Some(Redirect::TryAgain) => {
                            wait = true;
                            p.last = Some(r);
                        }
                        None => p.reply = Some(r),
                    }
                }
            }
            if round == REDIRECTS {
                break;
            }
            if refresh {
                self.refresh().map_err(|e| io_error(&e.to_string()))?;
                // Moved again after a map read: the cluster is still settling.
                wait |= round > 0;
            }
            if wait {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for p in parts.iter_mut().filter(|p| p.reply.is_none()) {
            p.reply = Some(p.last.take().unwrap_or(Value::Nil));
        }
        Ok(())
    }

    fn run(&mut self, packed: &[u8]) -> RedisResult<Vec<Value>> {
        if self.stale {
            self.refresh().map_err(|e| io_error(&e.to_string()))?;
        }
        let commands = split_packed(packed).ok_or_else(|| io_error("a command it cannot read"))?;
        let (plans, mut parts) = self.plan(commands)?;
        self.send(&mut parts)?;
        let mut replies: Vec<Vec<Value>> = plans.iter().map(|_| Vec::new()).collect();
        for p in parts {
            if let Some(r) = replies.get_mut(p.of) {
                r.push(p.reply.unwrap_or(Value::Nil));
            }
        }
        let mut idle_wait = None;
        let out = plans
            .into_iter()
            .zip(replies)
            .map(|(plan, mut got)| match plan {
                Plan::Done(v) => v,
                Plan::One => got.pop().unwrap_or(Value::Nil),
                Plan::Scan { node, addr, next } => {
                    remap_scan(got.pop().unwrap_or(Value::Nil), node, &addr, next.as_ref())
                }
                Plan::Every => {
                    let first = got.first().cloned().unwrap_or(Value::Nil);
                    if got.iter().all(|r| *r == first) {
                        first
                    } else {
                        Value::Array(Vec::new())
                    }
                }
                Plan::Read { block } => {
                    let joined = join_reads(got);
                    if matches!(joined, Value::Nil) {
                        idle_wait = idle_wait.max(block.map(|b| b.min(IDLE_READ_WAIT)));
                    }
                    joined
                }
            })
            .collect();
        if let Some(wait) = idle_wait {
            std::thread::sleep(wait);
        }
        Ok(out)
    }
}

fn unavailable((host, port): &Addr, detail: &str) -> SyncError {
    SyncError::RedisUnavailable { server: format!("{host}:{port}/0"), detail: detail.to_owned() }
}

fn io_error(what: &str) -> RedisError {
    RedisError::from(std::io::Error::other(format!("Redis Cluster: {what}")))
}

enum Redirect {
    /// The slot is served by this node now (`None`: it did not say where).
    Moved(Option<Addr>),
    Ask(Addr),
    TryAgain,
}

/// A redirection in reply `v` from the node at `from`.
fn redirection(v: &Value, from: &Addr) -> Option<Redirect> {
    let Value::ServerError(e) = v else { return None };
    // "MOVED <slot> <host>:<port>", "ASK <slot> <host>:<port>"; an empty host is the
    // replying node's.
    let to = || -> Option<Addr> {
        let addr = e.details()?.split_whitespace().nth(1)?;
        let (host, port) = addr.rsplit_once(':')?;
        let host = if host.is_empty() { from.0.clone() } else { host.to_owned() };
        Some((host, port.parse().ok()?))
    };
    match e.code() {
        "MOVED" => Some(Redirect::Moved(to())),
        "TRYAGAIN" => Some(Redirect::TryAgain),
        "ASK" => Some(Redirect::Ask(to()?)),
        _ => None,
    }
}

fn scan_reply(cursor: u64, keys: Vec<Value>) -> Value {
    Value::Array(vec![Value::BulkString(cursor.to_string().into_bytes()), Value::Array(keys)])
}

/// A primary's SCAN reply with the cursor made the cluster's: the next primary's start
/// when this one is done, 0 when the last one is.
fn remap_scan(reply: Value, node: usize, addr: &Addr, next: Option<&Addr>) -> Value {
    let Value::Array(mut items) = reply else { return reply };
    let (Some(keys), Some(cursor)) = (items.pop(), items.pop()) else {
        return Value::Array(items);
    };
    let Some(cursor) = int(&cursor).and_then(|c| u64::try_from(c).ok()) else {
        return Value::Array(vec![cursor, keys]);
    };
    let Value::Array(keys) = keys else { return Value::Array(vec![]) };
    let cursor = if cursor != 0 {
        cluster_cursor(node, addr, cursor)
    } else if let Some(next) = next {
        cluster_cursor(node + 1, next, 0)
    } else {
        0
    };
    scan_reply(cursor, keys)
}

/// The replies of one read's parts joined into one reply; the first error is the answer.
fn join_reads(replies: Vec<Value>) -> Value {
    let mut all = Vec::new();
    for r in replies {
        match r {
            Value::Nil => {}
            Value::Array(items) => all.extend(items),
            other => return other,
        }
    }
    if all.is_empty() {
        Value::Nil
    } else {
        Value::Array(all)
    }
}

impl ConnectionLike for ClusterLink {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.run(cmd)?.pop().ok_or_else(|| io_error("no reply"))
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        if offset != 0 {
            return Err(io_error("transactions are not sent to a cluster"));
        }
        let out = self.run(cmd)?;
        if out.len() != count {
            return Err(io_error("replies and commands differ in number"));
        }
        Ok(out)
    }

    fn get_db(&self) -> i64 {
        0
    }

    fn check_connection(&mut self) -> bool {
        ::redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // The specification's CRC16 check value, and slots redis-cli reports.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"{user1000}.followers"));
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag hashes the whole key; only the first { counts.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn the_slot_map_is_read_from_cluster_slots() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("", 7000)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("127.0.0.1", 7002)]),
        ]);
        let t = Topology::parse(&reply, "seed").expect("parsed");
        assert_eq!(t.describe(), "127.0.0.1:7001,127.0.0.1:7002,seed:7000");
        assert_eq!(t.node_of(0), Some(&("seed".to_owned(), 7000)));
        assert_eq!(t.node_of(5461), Some(&("127.0.0.1".to_owned(), 7001)));
        assert_eq!(t.node_of(16383), Some(&("127.0.0.1".to_owned(), 7002)));
        let gap = Topology::parse(
            &Value::Array(vec![Value::Array(vec![Value::Int(10), Value::Int(20), node("h", 1)])]),
            "x",
        )
        .expect("parsed");
        assert_eq!(gap.node_of(9), None);
        let odd = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(9),
                Value::Array(vec![Value::Nil, Value::Int(5)]),
            ]),
            Value::Array(vec![Value::Int(10), Value::Int(20), node("?", 6)]),
        ]);
        let odd = Topology::parse(&odd, "asked").expect("parsed");
        assert_eq!(odd.node_of(3), Some(&("asked".to_owned(), 5)));
        assert_eq!(odd.node_of(15), None, "an unknown endpoint serves nothing reachable");
        assert_eq!(gap.node_of(21), None);
        assert!(gap.node_of(15).is_some());
    }

    #[test]
    fn seeds_are_hosts_with_optional_ports() {
        assert_eq!(
            parse_seeds("a:1, b ,[::1]:7,c", 6379),
            Ok(vec![("a".into(), 1), ("b".into(), 6379), ("::1".into(), 7), ("c".into(), 6379)])
        );
        assert_eq!(parse_seeds("::1", 6379), Ok(vec![("::1".into(), 6379)]));
        assert!(parse_seeds("a:0", 6379).is_err());
        assert!(parse_seeds("a:x", 6379).is_err());
        assert!(parse_seeds(" , ", 6379).is_err());
    }

    #[test]
    fn a_read_over_several_slots_is_split_per_slot() {
        let mut packed = Vec::new();
        let args: Args = [
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "COUNT",
            "10",
            "BLOCK",
            "500",
            "STREAMS",
            "foo",
            "bar",
            "{foo}x",
            "0",
            ">",
            "1-0",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        pack_into(&mut packed, &args);
        let b: Addr = ("b".into(), 2);
        let scan = |cursor: u64| vec![b"SCAN".to_vec(), cursor.to_string().into_bytes()];
        pack_into(&mut packed, &scan(cluster_cursor(1, &b, 42)));
        let commands = split_packed(&packed).expect("split");
        assert_eq!(commands[0], args);
        let link = ClusterLink {
            settings: RedisSettings::default(),
            seeds: Vec::new(),
            topology: Topology {
                ranges: vec![(0, 16383, 0)],
                primaries: vec![("a".into(), 1), ("b".into(), 2)],
            },
            conns: BTreeMap::new(),
            read_timeout: None,
            stale: false,
        };
        let (plans, parts) = link.plan(commands).expect("planned");
        assert!(
            matches!(plans[0], Plan::Read { block: Some(b) } if b == Duration::from_millis(500))
        );
        let text = |a: &Args| {
            a.iter().map(|x| String::from_utf8_lossy(x).into_owned()).collect::<Vec<_>>().join(" ")
        };
        assert_eq!(text(&parts[0].args), "XREADGROUP GROUP g c COUNT 10 STREAMS foo {foo}x 0 1-0");
        assert_eq!(text(&parts[1].args), "XREADGROUP GROUP g c COUNT 10 STREAMS bar >");
        assert!(matches!(&plans[1], Plan::Scan { node: 1, next: None, .. }));
        assert_eq!(text(&parts[2].args), "SCAN 42");
        assert_eq!(parts[2].to, Some(b.clone()));
        // A cursor of another node at that place (the primaries changed) is refused.
        let stranger: Addr = ("c".into(), 3);
        assert_ne!(address_check(&stranger), address_check(&b));
        assert!(link.plan(vec![scan(cluster_cursor(1, &stranger, 42))]).is_err());
        assert!(link.plan(vec![scan(cluster_cursor(2, &b, 42))]).is_err());
        // CONFIG GET asks every primary.
        let (plans, parts) = link
            .plan(vec![vec![b"CONFIG".to_vec(), b"GET".to_vec(), b"x".to_vec()]])
            .expect("planned");
        assert!(matches!(plans[0], Plan::Every));
        assert_eq!(parts.len(), 2);
    }

    #[test]
    fn scan_cursors_walk_every_primary() {
        let reply =
            |c: &str| scan_reply(c.parse().unwrap_or(0), vec![Value::BulkString(b"k".to_vec())]);
        let cursor = |v: Value| match v {
            Value::Array(items) => int(&items[0]),
            _ => None,
        };
        let (a, b): (Addr, Addr) = (("a".into(), 1), ("b".into(), 2));
        let start_of_b = cluster_cursor(1, &b, 0);
        assert_eq!(start_of_b >> CURSOR_SHIFT, 1);
        assert_ne!(start_of_b, 0);
        let on = |c: Value| cursor(c).and_then(|c| u64::try_from(c).ok());
        assert_eq!(on(remap_scan(reply("17"), 0, &a, Some(&b))), Some(cluster_cursor(0, &a, 17)));
        assert_eq!(on(remap_scan(reply("0"), 0, &a, Some(&b))), Some(start_of_b));
        assert_eq!(on(remap_scan(reply("5"), 1, &b, None)), Some(cluster_cursor(1, &b, 5)));
        assert_eq!(on(remap_scan(reply("0"), 1, &b, None)), Some(0));
        assert_eq!(cluster_cursor(1, &b, 5) & CURSOR_MASK, 5);
    }

    #[test]
    fn reads_joined_keep_entries_and_errors() {
        let a = Value::Array(vec![Value::Int(1)]);
        let b = Value::Array(vec![Value::Int(2)]);
        assert_eq!(join_reads(vec![Value::Nil, Value::Nil]), Value::Nil);
        assert_eq!(
            join_reads(vec![a.clone(), Value::Nil, b]),
            Value::Array(vec![Value::Int(1), Value::Int(2)])
        );
        let err = Value::SimpleString("x".into());
        assert_eq!(join_reads(vec![a, err.clone()]), err);
    }
}

//! A plain-TCP connection to Redis with a reply parser of its own, for the worker's reads and
//! passes: a stream read of a thousand entries is some thirteen thousand RESP values, and the
//! client library's general parser (built for partial, asynchronous input) spent most of a
//! stream reader's time on them. This one reads RESP2 straight from a buffered socket: one
//! allocation per string or array, nothing else; a stream read's reply goes straight into
//! entries, each entry's fields in one buffer ([`read_entries`]).
//!
//! It implements the library's `ConnectionLike`, so commands and pipelines are built and
//! their other replies converted exactly as on a library connection; error replies are handed to
//! the library's own parser, so they carry the same codes. Only a connection that the
//! library would make the same way is made here (no TLS); anything unexpected during the
//! handshake leaves the choice to the library (see `RedisConn::connect_fast`).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use ::redis::{ConnectionLike, RedisError, RedisResult, Value};

use super::conn::StreamEntries;
use super::fields::Fields;
use super::reply::RawEntry;

/// Deepest nesting of arrays accepted (a stream read is three deep).
const MAX_DEPTH: usize = 16;

pub struct RawConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    db: i64,
    open: bool,
    line: Vec<u8>,
}

fn invalid(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned()))
}

impl RawConn {
    /// Connects, authenticates and selects `db`. `Ok(None)` when Redis answered the handshake
    /// with an error (the caller connects through the library, which says what it was).
    pub fn connect(
        host: &str,
        port: u16,
        username: &str,
        password: &str,
        db: u8,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> std::io::Result<Option<RawConn>> {
        let mut last = None;
        let mut stream = None;
        for addr in (host, port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(stream) = stream else {
            return Err(last.unwrap_or_else(|| std::io::Error::other("no address")));
        };
        stream.set_nodelay(true)?;
        // The handshake has the connect timeout; commands the I/O timeout.
        stream.set_read_timeout(Some(connect_timeout))?;
        stream.set_write_timeout(Some(connect_timeout))?;
        let writer = stream.try_clone()?;
        let mut c = RawConn {
            reader: BufReader::with_capacity(256 * 1024, stream),
            writer,
            db: db as i64,
            open: true,
            line: Vec::with_capacity(64),
        };
        let mut hello = ::redis::pipe();
        if !password.is_empty() {
            let auth = hello.cmd("AUTH");
            if !username.is_empty() {
                auth.arg(username);
            }
            auth.arg(password);
        }
        if db != 0 {
            hello.cmd("SELECT").arg(db);
        }
        hello.cmd("PING");
        let count = hello.len();
        let replies = c.req_packed_commands(&hello.get_packed_pipeline(), 0, count);
        match replies {
            Ok(values) if !values.iter().any(|v| matches!(v, Value::ServerError(_))) => {
                c.writer.set_read_timeout(Some(io_timeout))?;
                c.writer.set_write_timeout(Some(io_timeout))?;
                Ok(Some(c))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.writer.set_read_timeout(timeout)
    }

    fn send(&mut self, bytes: &[u8]) -> RedisResult<()> {
        // A connection that failed once is out of step (a late reply may still come): it
        // takes no more commands, and the caller connects again.
        if !self.open {
            return Err(std::io::Error::from(std::io::ErrorKind::NotConnected).into());
        }
        let sent = self.writer.write_all(bytes);
        if sent.is_err() {
            self.close();
        }
        Ok(sent?)
    }

    /// The next reply; an I/O or protocol error closes the connection.
    fn next(&mut self) -> RedisResult<Value> {
        let v = read_value(&mut self.reader, &mut self.line, 0);
        if v.is_err() {
            self.close();
        }
        v
    }

    /// Sends a pipeline of `count` commands and reads every reply, those at the indices in
    /// `reads` (`XREADGROUP`s) as stream reads; an error reply is a value, as with a pipeline
    /// that ignores errors. An I/O or protocol error closes the connection.
    pub fn pipeline(
        &mut self,
        cmd: &[u8],
        count: usize,
        reads: &[usize],
    ) -> RedisResult<Vec<Reply>> {
        self.send(cmd)?;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let reply = if reads.contains(&i) {
                read_entries(&mut self.reader, &mut self.line)
            } else {
                read_value(&mut self.reader, &mut self.line, 0).map(Reply::Value)
            };
            match reply {
                Ok(r) => out.push(r),
                Err(e) => {
                    self.close();
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn close(&mut self) {
        self.open = false;
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }
}

/// The header line of a value (without its CRLF), in `line`.
fn read_line<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> RedisResult<()> {
    line.clear();
    if r.read_until(b'\n', line)? == 0 {
        return Err(RedisError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)));
    }
    if !line.ends_with(b"\r\n") {
        return Err(invalid("a reply line without CRLF"));
    }
    line.truncate(line.len() - 2);
    Ok(())
}

fn number(digits: &[u8]) -> RedisResult<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("a reply length or integer that is not a number"))
}

/// Hands the `len` bytes of a bulk string (its header read) to `sink` as they come from the
/// buffer, then checks its CRLF.
fn copy_bulk<R: BufRead>(r: &mut R, len: usize, mut sink: impl FnMut(&[u8])) -> RedisResult<()> {
    let mut left = len;
    while left > 0 {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        let take = chunk.len().min(left);
        sink(&chunk[..take]);
        r.consume(take);
        left -= take;
    }
    let mut end = [0u8; 2];
    r.read_exact(&mut end)?;
    if &end != b"\r\n" {
        return Err(invalid("a bulk string without CRLF"));
    }
    Ok(())
}

/// The length in a header line of `kind` (`*` or `$`); `None` for a nil (-1).
fn header<R: BufRead>(r: &mut R, line: &mut Vec<u8>, kind: u8) -> RedisResult<Option<usize>> {
    read_line(r, line)?;
    match line.split_first() {
        Some((&k, rest)) if k == kind => {
            let len = number(rest)?;
            if len < 0 {
                return Ok(None);
            }
            usize::try_from(len).map(Some).map_err(|_| invalid("a length"))
        }
        _ => Err(invalid("a stream read reply of an unexpected shape")),
    }
}

/// A bulk string that must be there (a stream's key, an entry's ID).
fn bulk<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> RedisResult<Vec<u8>> {
    let len = header(r, line, b'$')?.ok_or_else(|| invalid("a nil where a string belongs"))?;
    let mut bytes = Vec::with_capacity(len.min(1 << 20));
    copy_bulk(r, len, |chunk| bytes.extend_from_slice(chunk))?;
    Ok(bytes)
}

/// One reply of [`RawConn::pipeline`]: a stream read's entries, parsed straight from the
/// socket's buffer (each entry's fields into one [`Fields`] buffer, no value tree), or any
/// other reply as a value (an error reply of a read too).
#[derive(Debug)]
pub enum Reply {
    Value(Value),
    Entries(StreamEntries),
}

/// Reads the reply of an `XREADGROUP` (RESP2): nil, or for each stream its key and entries,
/// each entry its ID and its fields (nil for an entry deleted while pending).
pub fn read_entries<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> RedisResult<Reply> {
    read_line(r, line)?;
    let streams = match line.split_first() {
        Some((b'-', _)) => {
            line.extend_from_slice(b"\r\n");
            return ::redis::parse_redis_value(line).map(Reply::Value);
        }
        Some((b'*' | b'$', rest)) => match number(rest)? {
            n if n < 0 => return Ok(Reply::Entries(Vec::new())),
            n => usize::try_from(n).map_err(|_| invalid("an array length"))?,
        },
        _ => return Err(invalid("a stream read reply of an unexpected shape")),
    };
    if line.first() == Some(&b'$') {
        return Err(invalid("a stream read reply of an unexpected shape"));
    }
    let mut out = Vec::with_capacity(streams.min(1 << 16));
    for _ in 0..streams {
        if header(r, line, b'*')? != Some(2) {
            return Err(invalid("a stream read reply of an unexpected shape"));
        }
        let key = bulk(r, line)?;
        let n = header(r, line, b'*')?.unwrap_or(0);
        let mut entries = Vec::with_capacity(n.min(1 << 16));
        let mut hint = 0;
        for _ in 0..n {
            if header(r, line, b'*')? != Some(2) {
                return Err(invalid("a stream entry of an unexpected shape"));
            }
            let id = bulk(r, line)?;
            // (An entry ID is ASCII: taken, not copied.)
            let id = String::from_utf8(id)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            let fields = match header(r, line, b'*')? {
                None => None,
                Some(parts) if parts % 2 == 0 => {
                    // (Entries of one stream are mostly alike: the last one's size is the
                    // guess, so a buffer is seldom grown.)
                    let mut fields = Fields::with_capacity(hint.max(parts.min(1 << 10) * 12));
                    for _ in 0..parts {
                        let len = header(r, line, b'$')?
                            .ok_or_else(|| invalid("a nil where a string belongs"))?;
                        let len32 =
                            u32::try_from(len).map_err(|_| invalid("a field over 4 GiB"))?;
                        fields.begin_part(len32);
                        copy_bulk(r, len, |chunk| fields.extend_part(chunk))?;
                    }
                    Some(fields)
                }
                Some(_) => return Err(invalid("an entry with a name but no value")),
            };
            if let Some(f) = &fields {
                hint = f.bytes().min(1 << 16);
            }
            entries.push(RawEntry { id, fields });
        }
        out.push((key, entries));
    }
    Ok(Reply::Entries(out))
}

/// Reads one RESP2 value.
pub fn read_value<R: BufRead>(r: &mut R, line: &mut Vec<u8>, depth: usize) -> RedisResult<Value> {
    if depth > MAX_DEPTH {
        return Err(invalid("a reply nested too deep"));
    }
    read_line(r, line)?;
    let Some((&kind, rest)) = line.split_first() else {
        return Err(invalid("an empty reply line"));
    };
    match kind {
        b'$' => {
            let len = number(rest)?;
            if len < 0 {
                return Ok(Value::Nil);
            }
            let len = usize::try_from(len).map_err(|_| invalid("a bulk length"))?;
            // Copied from the buffer as it fills (no zeroed allocation to read into); grown as
            // the bytes come, so a wrong length cannot ask for memory up front.
            let mut bytes = Vec::with_capacity(len.min(1 << 20));
            copy_bulk(r, len, |chunk| bytes.extend_from_slice(chunk))?;
            Ok(Value::BulkString(bytes))
        }
        b'*' => {
            let len = number(rest)?;
            if len < 0 {
                return Ok(Value::Nil);
            }
            let len = usize::try_from(len).map_err(|_| invalid("an array length"))?;
            let mut items = Vec::with_capacity(len.min(1 << 16));
            for _ in 0..len {
                items.push(read_value(r, line, depth + 1)?);
            }
            Ok(Value::Array(items))
        }
        b':' => Ok(Value::Int(number(rest)?)),
        b'+' if rest == b"OK" => Ok(Value::Okay),
        b'+' => Ok(Value::SimpleString(String::from_utf8_lossy(rest).into_owned())),
        b'-' => {
            // The library's own parser makes the error (its code, its kind).
            line.extend_from_slice(b"\r\n");
            ::redis::parse_redis_value(line)
        }
        _ => Err(invalid("a reply type this connection does not speak (RESP3?)")),
    }
}

impl ConnectionLike for RawConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.send(cmd)?;
        self.next()
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.send(cmd)?;
        // Every reply is read, errors among them too, so the connection stays in step.
        let mut out = Vec::with_capacity(count);
        let mut refused = false;
        for i in 0..offset + count {
            let v = self.next()?;
            if i >= offset {
                out.push(v);
            } else if matches!(v, Value::ServerError(_)) {
                refused = true;
            }
        }
        // (Only a transaction's pipeline skips replies: those of MULTI and its queued
        // commands, one of which Redis refused; the transaction did not run.)
        if refused {
            return Err(invalid("a command of the transaction was refused; it did not run"));
        }
        Ok(out)
    }

    fn get_db(&self) -> i64 {
        self.db
    }

    fn check_connection(&mut self) -> bool {
        ::redis::cmd("PING").query::<String>(self).is_ok()
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> RedisResult<Value> {
        read_value(&mut &bytes[..], &mut Vec::new(), 0)
    }

    #[test]
    fn a_stream_read_reply_parses_as_the_library_parses_it() {
        let reply: &[u8] = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*4\r\n$1\r\na\r\n$2\r\n\r\n\r\n$1\r\nb\r\n$0\r\n\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n";
        assert_eq!(parse(reply).ok(), ::redis::parse_redis_value(reply).ok());
        assert!(matches!(parse(reply), Ok(Value::Array(_))));
    }

    #[test]
    fn values_split_across_reads_of_the_socket_parse_whole() {
        let reply: &[u8] = b"*2\r\n$11\r\nhello world\r\n$3\r\n\r\n\n\r\n";
        for capacity in [1, 2, 3, 7, 64] {
            let mut r = std::io::BufReader::with_capacity(capacity, reply);
            let v = read_value(&mut r, &mut Vec::new(), 0).expect("a value");
            assert_eq!(Some(v), ::redis::parse_redis_value(reply).ok(), "{capacity}");
        }
    }

    #[test]
    fn every_resp2_type_parses_as_the_library_parses_it() {
        for reply in [
            &b"+OK\r\n"[..],
            b"+PONG\r\n",
            b":-42\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"$5\r\nhe\0lo\r\n",
        ] {
            assert_eq!(parse(reply).ok(), ::redis::parse_redis_value(reply).ok(), "{reply:?}");
        }
    }

    #[test]
    fn a_connection_that_failed_takes_no_more_commands() {
        use std::sync::mpsc::channel;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (timed_out, on_timeout) = channel::<()>();
        let (late_sent, on_late) = channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 256];
            let _ = std::io::Read::read(&mut s, &mut buf);
            s.write_all(b"+PONG\r\n").expect("PONG");
            let _ = std::io::Read::read(&mut s, &mut buf);
            // The GET's reply comes only after the client gave up on it, and a PONG after.
            on_timeout.recv().expect("the client's timeout");
            s.write_all(b"$-1\r\n+PONG\r\n").expect("late replies");
            late_sent.send(()).expect("tell");
            // Kept open until the client is done.
            let _ = std::io::Read::read(&mut s, &mut buf);
        });
        let mut c = RawConn::connect(
            "127.0.0.1",
            port,
            "",
            "",
            0,
            Duration::from_secs(5),
            Duration::from_millis(200),
        )
        .expect("connect")
        .expect("no error reply");
        assert!(::redis::cmd("GET").arg("k").query::<Value>(&mut c).is_err(), "timed out");
        assert!(!c.is_open());
        timed_out.send(()).expect("tell");
        on_late.recv().expect("late replies sent");
        // Out of step, it would take the GET's late nil as the PING's reply.
        let again = ::redis::cmd("PING").query::<Value>(&mut c).expect_err("refused");
        assert_eq!(again.code(), None, "a lost connection, not a Redis error: {again}");
        drop(c);
        server.join().expect("server");
    }

    type Stream = (Vec<u8>, Vec<(String, Option<Vec<(Vec<u8>, Vec<u8>)>>)>);

    fn resp_bulk(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
        out.extend_from_slice(b);
        out.extend_from_slice(b"\r\n");
    }

    /// The RESP2 bytes Redis sends for an XREADGROUP that found `streams`.
    fn read_reply(streams: &[Stream]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", streams.len()).into_bytes();
        for (key, entries) in streams {
            out.extend_from_slice(b"*2\r\n");
            resp_bulk(&mut out, key);
            out.extend_from_slice(format!("*{}\r\n", entries.len()).as_bytes());
            for (id, fields) in entries {
                out.extend_from_slice(b"*2\r\n");
                resp_bulk(&mut out, id.as_bytes());
                match fields {
                    None => out.extend_from_slice(b"*-1\r\n"),
                    Some(fields) => {
                        out.extend_from_slice(format!("*{}\r\n", fields.len() * 2).as_bytes());
                        for (n, v) in fields {
                            resp_bulk(&mut out, n);
                            resp_bulk(&mut out, v);
                        }
                    }
                }
            }
        }
        out
    }

    fn entries_of(bytes: &[u8], capacity: usize) -> RedisResult<Reply> {
        let mut r = std::io::BufReader::with_capacity(capacity, bytes);
        read_entries(&mut r, &mut Vec::new())
    }

    proptest::proptest! {
        #[test]
        fn a_stream_read_parsed_straight_is_the_library_values_parsed(
            streams in proptest::collection::vec(
                (
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
                    proptest::collection::vec(
                        (
                            "[0-9]{1,13}-[0-9]{1,3}",
                            proptest::option::of(proptest::collection::vec(
                                (
                                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8),
                                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
                                ),
                                0..5,
                            )),
                        ),
                        0..6,
                    ),
                ),
                0..4,
            ),
            capacity in 1usize..64,
        ) {
            let bytes = read_reply(&streams);
            let by_values = super::super::reply::parse_read(parse(&bytes).expect("a value"))
                .expect("a read reply");
            let Ok(Reply::Entries(straight)) = entries_of(&bytes, capacity) else {
                return Err(proptest::test_runner::TestCaseError::fail("not entries"));
            };
            proptest::prop_assert_eq!(straight, by_values);
        }
    }

    #[test]
    fn a_stream_read_reply_of_another_shape_is_an_error_not_entries() {
        assert!(matches!(entries_of(b"*-1\r\n", 8), Ok(Reply::Entries(e)) if e.is_empty()));
        let refused = entries_of(b"-NOGROUP No such key\r\n", 8);
        assert!(
            matches!(&refused, Ok(Reply::Value(Value::ServerError(e))) if e.code() == "NOGROUP"),
            "{refused:?}"
        );
        for reply in [
            &b":1\r\n"[..],
            b"$3\r\nabc\r\n",
            b"*1\r\n*3\r\n$1\r\ns\r\n*0\r\n*0\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*1\r\n$1\r\na\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$-1\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$4\r\nab",
        ] {
            assert!(entries_of(reply, 8).is_err(), "{reply:?}");
        }
    }

    #[test]
    fn an_error_reply_keeps_its_code() {
        let v = parse(b"-NOGROUP No such key 's' or consumer group 'g'\r\n").expect("a value");
        let Value::ServerError(e) = v else { panic!("not an error: {v:?}") };
        assert_eq!(e.code(), "NOGROUP");
    }

    #[test]
    fn broken_replies_are_errors_not_values() {
        for reply in [
            &b"$5\r\nhel"[..],
            b"$3\r\nabcd\r\n",
            b"*2\r\n:1\r\n",
            b":x\r\n",
            b"%1\r\n",
            b"+OK\n",
            b"",
        ] {
            assert!(parse(reply).is_err(), "{reply:?}");
        }
    }
}

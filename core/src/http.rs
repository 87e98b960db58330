//! The HTTP/1.1 a watch needs from a Consul agent: one GET request, and the
//! response read with bounds — its head (httparse), then a body of known
//! length, a chunked one (Go's net/http, Consul's server, chunks any answer it
//! did not size up front), or one that ends with the connection. Both clients
//! (worker 0's watch, the master's one request before it forks workers) read
//! with [`ResponseReader`].

use std::fmt::Write as _;

/// The longest response head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Headers a response head may have.
const MAX_HEADERS: usize = 64;
/// The longest chunk-size line (with extensions) or trailer line.
const MAX_LINE: usize = 4096;

/// How the body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Read until the server closes (no length, not chunked).
    Close,
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// The connection may carry the next request.
    pub keep_alive: bool,
    /// `X-Consul-Index`: `None` when absent or not a number.
    pub consul_index: Option<u64>,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token may not read some
    /// of the result (Consul leaves it out silently).
    pub acl_filtered: bool,
    /// Bytes of the head (where the body starts).
    pub len: usize,
}

/// Builds a GET request.
pub fn get_request(target: &str, host: &str, token: Option<&str>) -> Vec<u8> {
    let mut r = String::with_capacity(160 + target.len());
    let _ = write!(
        r,
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ngx-consul\r\nAccept: application/json\r\n"
    );
    if let Some(token) = token {
        let _ = write!(r, "X-Consul-Token: {token}\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// The head, once `buf` holds all of it (`Ok(None)`: not yet).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err("response head too large".into())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head ({e})")),
    };
    let status = resp.code.unwrap_or(0);
    if !(200..=599).contains(&status) {
        return Err(format!("unexpected status {status}"));
    }
    let mut keep_alive = resp.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut consul_index = None;
    let mut acl_filtered = false;
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| format!("invalid Content-Length \"{}\"", clip(value)))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            if !last.eq_ignore_ascii_case("chunked") || value.contains(',') {
                return Err(format!("unsupported Transfer-Encoding \"{}\"", clip(value)));
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                keep_alive = false;
            }
        } else if h.name.eq_ignore_ascii_case("x-consul-index") {
            consul_index = value.parse().ok();
        } else if h
            .name
            .eq_ignore_ascii_case("x-consul-results-filtered-by-acls")
        {
            acl_filtered = value.eq_ignore_ascii_case("true");
        } else if h.name.eq_ignore_ascii_case("content-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(format!("unsupported Content-Encoding \"{}\"", clip(value)));
        }
    }
    let framing = if chunked {
        // Both: the length is not to be trusted (RFC 9112, 6.3), nor the connection.
        if length.is_some() {
            keep_alive = false;
        }
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Some(Head {
        status,
        framing,
        keep_alive,
        consul_index,
        acl_filtered,
        len,
    }))
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    Size {
        value: u64,
        digits: usize,
    },
    /// The rest of a size line (extensions), up to LF.
    SizeLine {
        value: u64,
        len: usize,
    },
    Data {
        left: u64,
    },
    /// The CRLF after a chunk's data.
    DataEnd {
        cr: bool,
    },
    /// Trailer lines, up to an empty one.
    Trailer {
        len: usize,
    },
    Done,
}

/// Decodes a chunked body as it arrives.
#[derive(Clone, Debug)]
pub struct Chunked {
    state: State,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending the data to `out` (which may hold at most
    /// `max` bytes); returns the bytes of `input` used. After the last chunk
    /// and its trailers, [`Chunked::is_done`] and nothing more is used.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>, max: usize) -> Result<usize, String> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Size { value, digits } => match (b as char).to_digit(16) {
                    Some(d) => {
                        if digits >= 16 {
                            return Err("chunk size too large".into());
                        }
                        State::Size {
                            value: value << 4 | u64::from(d),
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => return Err("malformed chunk size".into()),
                    None => {
                        // `;extensions` or the CRLF: the line ends at LF.
                        if b == b'\n' {
                            self.size_done(value)
                        } else if b == b';' || b == b'\r' || b == b' ' || b == b'\t' {
                            State::SizeLine { value, len: 1 }
                        } else {
                            return Err("malformed chunk size".into());
                        }
                    }
                },
                State::SizeLine { value, len } => {
                    if b == b'\n' {
                        self.size_done(value)
                    } else if len >= MAX_LINE {
                        return Err("chunk size line too long".into());
                    } else {
                        State::SizeLine {
                            value,
                            len: len + 1,
                        }
                    }
                }
                State::Data { left } => {
                    let n = (left.min((input.len() - i) as u64)) as usize;
                    if out.len() + n > max {
                        return Err(too_large(max));
                    }
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd { cr: false }
                    } else {
                        State::Data { left }
                    };
                    continue;
                }
                State::DataEnd { cr } => match (b, cr) {
                    (b'\r', false) => State::DataEnd { cr: true },
                    (b'\n', _) => State::Size {
                        value: 0,
                        digits: 0,
                    },
                    _ => return Err("malformed chunk end".into()),
                },
                State::Trailer { len } => {
                    if b == b'\n' {
                        if len == 0 {
                            i += 1;
                            self.state = State::Done;
                            return Ok(i);
                        }
                        State::Trailer { len: 0 }
                    } else if b == b'\r' && len == 0 {
                        State::Trailer { len: 0 }
                    } else if len >= MAX_LINE {
                        return Err("trailer line too long".into());
                    } else {
                        State::Trailer { len: len + 1 }
                    }
                }
            };
            i += 1;
        }
        Ok(i)
    }

    fn size_done(&self, value: u64) -> State {
        if value == 0 {
            State::Trailer { len: 0 }
        } else {
            State::Data { left: value }
        }
    }
}

/// An answer: status, `X-Consul-Index`, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub index: Option<u64>,
    /// ACLs left some of the result out (`X-Consul-Results-Filtered-By-ACLs`).
    pub acl_filtered: bool,
    pub body: Vec<u8>,
}

/// How far [`ResponseReader::push`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed.
    More,
    /// The whole response; `reusable` when the connection may carry the next
    /// request (keep-alive, and nothing came beyond the response).
    Done { response: Response, reusable: bool },
}

/// A response read as its bytes arrive: the head, then the body as the head
/// frames it, at most `max_body` bytes of it.
#[derive(Debug)]
pub struct ResponseReader {
    max_body: usize,
    /// The head until it is whole; then the body.
    buf: Vec<u8>,
    head: Option<Head>,
    chunked: Chunked,
}

impl ResponseReader {
    pub fn new(max_body: usize) -> ResponseReader {
        ResponseReader {
            max_body,
            buf: Vec::new(),
            head: None,
            chunked: Chunked::default(),
        }
    }

    /// Reads `data`, the next bytes from the connection.
    pub fn push(&mut self, data: &[u8]) -> Result<Progress, String> {
        if self.head.is_none() {
            self.buf.extend_from_slice(data);
            let Some(head) = parse_head(&self.buf)? else {
                return Ok(Progress::More);
            };
            if let Framing::Length(n) = head.framing {
                if n > self.max_body as u64 {
                    return Err(too_large(self.max_body));
                }
            }
            let rest = self.buf.split_off(head.len);
            self.buf.clear();
            self.head = Some(head);
            return self.body(&rest);
        }
        self.body(data)
    }

    fn body(&mut self, data: &[u8]) -> Result<Progress, String> {
        let Some((framing, keep_alive)) = self.head.as_ref().map(|h| (h.framing, h.keep_alive))
        else {
            return Ok(Progress::More);
        };
        let clean = match framing {
            Framing::Length(n) => {
                self.buf.extend_from_slice(data);
                if (self.buf.len() as u64) < n {
                    return Ok(Progress::More);
                }
                // Bytes beyond the answer: the connection is out of step.
                let clean = self.buf.len() as u64 == n;
                self.buf.truncate(n as usize);
                clean
            }
            Framing::Chunked => {
                let used = self.chunked.decode(data, &mut self.buf, self.max_body)?;
                if !self.chunked.is_done() {
                    return Ok(Progress::More);
                }
                used == data.len()
            }
            Framing::Close => {
                self.buf.extend_from_slice(data);
                if self.buf.len() > self.max_body {
                    return Err(too_large(self.max_body));
                }
                return Ok(Progress::More);
            }
        };
        Ok(Progress::Done {
            response: self.response(),
            reusable: clean && keep_alive,
        })
    }

    /// The server closed the connection: the response, if it ends that way
    /// (`None`: it closed in the middle of the answer).
    pub fn end(&mut self) -> Option<Response> {
        match &self.head {
            Some(head) if head.framing == Framing::Close => Some(self.response()),
            _ => None,
        }
    }

    fn response(&mut self) -> Response {
        let (status, index, acl_filtered) = self.head.as_ref().map_or((0, None, false), |h| {
            (h.status, h.consul_index, h.acl_filtered)
        });
        Response {
            status,
            index,
            acl_filtered,
            body: std::mem::take(&mut self.buf),
        }
    }
}

/// "answer larger than 8 MiB": the reason given for a body over the cap.
pub fn too_large(max: usize) -> String {
    if max >= 1 << 20 && max.is_multiple_of(1 << 20) {
        format!("answer larger than {} MiB", max >> 20)
    } else if max >= 1 << 10 && max.is_multiple_of(1 << 10) {
        format!("answer larger than {} KiB", max >> 10)
    } else {
        format!("answer larger than {max} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request() {
        let r = get_request(
            "/v1/health/service/redis?index=7&wait=300000ms",
            "127.0.0.1:8500",
            Some("t0k"),
        );
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "GET /v1/health/service/redis?index=7&wait=300000ms HTTP/1.1\r\nHost: 127.0.0.1:8500\r\nUser-Agent: ngx-consul\r\nAccept: application/json\r\nX-Consul-Token: t0k\r\n\r\n"
        );
        let r = get_request("/x", "h", None);
        assert!(!String::from_utf8(r).unwrap().contains("Token"));
    }

    fn head(s: &str) -> Result<Option<Head>, String> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn consul_heads() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nVary: Accept-Encoding\r\nX-Consul-Default-Acl-Policy: deny\r\nX-Consul-Effective-Consistency: leader\r\nX-Consul-Index: 1234\r\nX-Consul-Knownleader: true\r\nX-Consul-Lastcontact: 0\r\nX-Consul-Query-Backend: blocking-query\r\nDate: Mon, 01 Dec 2026 10:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[]").unwrap().unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive, h.consul_index),
            (200, Framing::Chunked, true, Some(1234))
        );
        let h = head("HTTP/1.1 200 OK\r\nX-Consul-Results-Filtered-By-Acls: true\r\nContent-Length: 2\r\n\r\n[]").unwrap().unwrap();
        assert!(h.acl_filtered);
        let h = head("HTTP/1.1 403 Forbidden\r\nContent-Length: 14\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nACL not found\n").unwrap().unwrap();
        assert_eq!(
            (h.status, h.framing, h.consul_index),
            (403, Framing::Length(14), None)
        );
        assert_eq!(h.len, 87);
        let h = head("HTTP/1.0 200 OK\r\nX-Consul-Index: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.framing, h.keep_alive, h.consul_index),
            (Framing::Close, false, None)
        );
        let h =
            head("HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
    }

    #[test]
    fn partial_and_bad_heads() {
        assert_eq!(head("HTTP/1.1 200 OK\r\nContent-Le"), Ok(None));
        assert_eq!(head(""), Ok(None));
        for (h, want) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "invalid Content-Length \"-1\"",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting Content-Length headers",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                "unsupported Transfer-Encoding \"gzip\"",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "unsupported Transfer-Encoding \"gzip, chunked\"",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n",
                "unsupported Content-Encoding \"gzip\"",
            ),
            ("HTTP/1.1 100 Continue\r\n\r\n", "unexpected status 100"),
            (
                "SSH-2.0-OpenSSH_9.2\r\n",
                "malformed response head (invalid HTTP version)",
            ),
            (
                "HTTP/1.1 2000 OK\r\n\r\n",
                "malformed response head (invalid response status)",
            ),
        ] {
            assert_eq!(head(h).unwrap_err(), want, "{h:?}");
        }
        let big = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(head(&big).unwrap_err(), "response head too large");
        let many: String = (0..100).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"))
            .unwrap_err()
            .starts_with("malformed response head"));
    }

    fn dechunk(input: &[u8], step: usize, max: usize) -> Result<(Vec<u8>, usize, bool), String> {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let mut used = 0;
        for part in input.chunks(step.max(1)) {
            let n = c.decode(part, &mut out, max)?;
            used += n;
            if n < part.len() {
                break;
            }
        }
        Ok((out, used, c.is_done()))
    }

    #[test]
    fn chunked_bodies_in_any_pieces() {
        let body = b"5\r\n[{\"a\"\r\n3;ext=1\r\n:1}\r\n1\r\n]\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (out, used, done) = dechunk(body, step, 1 << 20).unwrap();
            assert_eq!(out, b"[{\"a\":1}]", "step {step}");
            assert!(done);
            assert_eq!(
                used,
                body.len() - 4,
                "the next response is not eaten (step {step})"
            );
        }
        let (out, _, done) = dechunk(b"A\n0123456789\n0\n\n", 3, 100).unwrap();
        assert_eq!((out.len(), done), (10, true), "bare LF line ends");
        let (_, _, done) = dechunk(b"5\r\nab", 64, 100).unwrap();
        assert!(!done, "a truncated body is not complete");
    }

    #[test]
    fn chunked_errors() {
        for (b, want) in [
            (&b"x\r\n"[..], "malformed chunk size"),
            (b"\r\n", "malformed chunk size"),
            (b"1\r\nab", "malformed chunk end"),
            (b"11111111111111111\r\n", "chunk size too large"),
            (b"5x\r\n", "malformed chunk size"),
        ] {
            assert_eq!(
                dechunk(b, 64, 100).unwrap_err(),
                want,
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        let huge = [&b"fffffffffffffff\r\n"[..], &[b'x'; 101]].concat();
        assert_eq!(
            dechunk(&huge, 7, 100).unwrap_err(),
            "answer larger than 100 bytes"
        );
        let long_ext = format!("1;{}\r\n", "e".repeat(MAX_LINE + 1));
        assert_eq!(
            dechunk(long_ext.as_bytes(), 64, 100).unwrap_err(),
            "chunk size line too long"
        );
        assert_eq!(too_large(8 << 20), "answer larger than 8 MiB");
        assert_eq!(too_large(1542 * 16 * 1024), "answer larger than 24672 KiB");
    }

    /// Reads `bytes` in pieces of `step`, then the end of the connection.
    fn read_all(bytes: &[u8], step: usize, max: usize) -> Result<(Response, bool), String> {
        let mut r = ResponseReader::new(max);
        for piece in bytes.chunks(step) {
            if let Progress::Done { response, reusable } = r.push(piece)? {
                return Ok((response, reusable));
            }
        }
        r.end()
            .map(|resp| (resp, false))
            .ok_or_else(|| "closed in the middle".to_string())
    }

    #[test]
    fn responses_in_any_pieces() {
        let sized = b"HTTP/1.1 200 OK\r\nX-Consul-Index: 42\r\nContent-Length: 5\r\n\r\n[1,2]";
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Consul-Results-Filtered-By-ACLs: true\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        let closed = b"HTTP/1.0 200 OK\r\n\r\n[1,2]";
        for step in [1, 2, 7, 1000] {
            let (r, reusable) = read_all(sized, step, 100).unwrap();
            assert_eq!(
                (r.status, r.index, &r.body[..], reusable),
                (200, Some(42), &b"[1,2]"[..], true)
            );
            let (r, reusable) = read_all(chunked, step, 100).unwrap();
            assert_eq!(
                (&r.body[..], r.acl_filtered, reusable),
                (&b"[1,2]"[..], true, true)
            );
            let (r, reusable) = read_all(closed, step, 100).unwrap();
            assert_eq!((&r.body[..], reusable), (&b"[1,2]"[..], false));
        }
        // Bytes beyond the answer: not reusable.
        let mut extra = sized.to_vec();
        extra.extend_from_slice(b"HTTP");
        assert!(!read_all(&extra, 1000, 100).unwrap().1);
        // Cut short, too large, malformed.
        assert!(read_all(&sized[..sized.len() - 1], 3, 100).is_err());
        assert_eq!(
            read_all(sized, 3, 4).unwrap_err(),
            "answer larger than 4 bytes"
        );
        assert_eq!(
            read_all(closed, 3, 4).unwrap_err(),
            "answer larger than 4 bytes"
        );
        assert!(read_all(b"HTTP/1.1 abc\r\n\r\n", 3, 4).is_err());
    }
}

//! The little HTTP/1.1 a probe needs to read an answer: the response head (skipping 1xx),
//! the body's framing (Content-Length, chunked, until close) and its decoding, and a search
//! for the expected text across chunks. Pure: no I/O, so every cut of the wire is testable.
//!
//! Kept over hyper 1's `client::conn::http1` by measurement (issue 16, 2026-11-30, one run,
//! 10,000 endpoints of a fleet nginx probed every 1 s, 30 s window after a 40 s warm-up, CPU
//! time from `/proc`, RSS max): hyper's handshake on the kept socket per probe and
//! `Connection::without_shutdown()` to take the socket back cost 0.274 core and 60.4 MiB;
//! this module, with the same scheduler around it, 0.191 core and 47.5 MiB; the code before
//! that scheduler work (the bar: 48.9 MiB + 10 %, its CPU + 10 %) 0.333 core and 48.5 MiB.
//! hyper is over the memory bar (+27 % here) and costs 43 % more CPU than ours: its per-probe
//! read and write buffers and dispatch state, where we read one small buffer. The hyper
//! variant was measured from this branch's `probe-hyper` feature (commit "Evaluation: probes
//! through hyper's client::conn::http1"), removed again after.

use super::probe::MAX_BODY_SCAN;

/// Parses the response head at the start of `buf`, skipping interim (1xx) answers: the
/// status, body framing and keep-alive, with the head removed from `buf`; `None` until the
/// head is whole. Synchronous, so that `httparse`'s header array (2 KiB) never lives across
/// an await in the probe future.
pub(super) fn parse_head(buf: &mut Vec<u8>) -> Result<Option<(u16, Framing, bool)>, String> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                if (100..200).contains(&status) && status != 101 {
                    buf.drain(..len);
                    continue;
                }
                let (framing, keep_alive) =
                    framing_of(&response, status).map_err(|e| format!("invalid response: {e}"))?;
                buf.drain(..len);
                return Ok(Some((status, framing, keep_alive)));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid response: {e}")),
        }
    }
}

/// The body's framing (RFC 9112 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Length(u64),
    Chunked,
    /// No length: the body ends when the connection does (never reused).
    UntilClose,
}

/// The framing of `response`'s body and whether the connection stays open after it.
pub(super) fn framing_of(
    response: &httparse::Response<'_, '_>,
    status: u16,
) -> Result<(Framing, bool), String> {
    let mut keep_alive = response.version == Some(1);
    let mut chunked = false;
    let mut length: Option<u64> = None;
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && response.version == Some(0) {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                keep_alive = false;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers".into());
            }
            length = Some(n);
        }
    }
    let framing = if status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok((framing, keep_alive))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyState {
    /// Length: bytes left. Chunked: data bytes left in the current chunk.
    Data(u64),
    /// Chunked: expecting a chunk-size line.
    Size,
    /// Chunked: expecting the CRLF after a chunk's data.
    DataEnd,
    /// Chunked: expecting trailer lines up to an empty one.
    Trailers,
    Done,
}

/// Decoding state of one body.
#[derive(Debug)]
pub(super) struct Body {
    framing: Framing,
    state: BodyState,
}

impl Body {
    pub(super) fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Data(n),
            Framing::Chunked => BodyState::Size,
            Framing::UntilClose => BodyState::Data(u64::MAX),
        };
        Self { framing, state }
    }

    /// How this body is framed.
    pub(super) fn framing(&self) -> Framing {
        self.framing
    }

    /// Ends a body framed until close, when the connection closed.
    pub(super) fn closed(&mut self) {
        self.state = BodyState::Done;
    }

    pub(super) fn done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Decodes what `buf` holds, handing the body's data to `data` and dropping what was
    /// decoded from `buf`.
    pub(super) fn decode(
        &mut self,
        buf: &mut Vec<u8>,
        mut data: impl FnMut(&[u8]),
    ) -> Result<(), String> {
        let mut pos = 0;
        loop {
            let left = &buf[pos..];
            match self.state {
                BodyState::Done => break,
                BodyState::Data(n) => {
                    if left.is_empty() {
                        break;
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(left.len());
                    data(&left[..take]);
                    pos += take;
                    let n = n - take as u64;
                    self.state = match (n, self.framing) {
                        (0, Framing::Chunked) => BodyState::DataEnd,
                        (0, _) => BodyState::Done,
                        (n, _) => BodyState::Data(n),
                    };
                }
                BodyState::Size => {
                    let Some(end) = find_crlf(left) else {
                        if left.len() > 1024 {
                            return Err("chunk-size line over 1 KiB".into());
                        }
                        break;
                    };
                    let line = std::str::from_utf8(&left[..end]).map_err(|_| "bad chunk size")?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|_| format!("bad chunk size {hex:?}"))?;
                    pos += end + 2;
                    self.state = if size == 0 {
                        BodyState::Trailers
                    } else {
                        BodyState::Data(size)
                    };
                }
                BodyState::DataEnd => {
                    if left.len() < 2 {
                        break;
                    }
                    if &left[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    pos += 2;
                    self.state = BodyState::Size;
                }
                BodyState::Trailers => {
                    let Some(end) = find_crlf(left) else {
                        if left.len() > 8 * 1024 {
                            return Err("trailers over 8 KiB".into());
                        }
                        break;
                    };
                    pos += end + 2;
                    if end == 0 {
                        self.state = BodyState::Done;
                    }
                }
            }
        }
        buf.drain(..pos);
        Ok(())
    }
}

pub(super) fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Looks for a substring in a body that arrives in chunks, within the first [`MAX_BODY_SCAN`]
/// bytes. Keeps only the last `needle.len() - 1` bytes between chunks.
pub(super) struct Scan<'a> {
    needle: &'a [u8],
    /// The end of what was seen so far (at most `needle.len() - 1` bytes) and, while
    /// searching, the chunk appended to it.
    window: Vec<u8>,
    seen: usize,
    found: bool,
}

impl<'a> Scan<'a> {
    pub(super) fn new(needle: &'a [u8]) -> Self {
        Self {
            needle,
            window: Vec::new(),
            seen: 0,
            found: needle.is_empty(),
        }
    }

    pub(super) fn found(&self) -> bool {
        self.found
    }

    pub(super) fn exhausted(&self) -> bool {
        self.seen >= MAX_BODY_SCAN
    }

    pub(super) fn feed(&mut self, chunk: &[u8]) {
        let chunk = &chunk[..chunk.len().min(MAX_BODY_SCAN - self.seen)];
        self.seen += chunk.len();
        let keep = self.needle.len().saturating_sub(1);
        if self.window.is_empty() {
            // The common case, a body in one chunk, is searched in place.
            self.found = contains(chunk, self.needle);
            self.window
                .extend_from_slice(&chunk[chunk.len().saturating_sub(keep)..]);
        } else {
            self.window.extend_from_slice(chunk);
            self.found = contains(&self.window, self.needle);
            let cut = self.window.len().saturating_sub(keep);
            self.window.drain(..cut);
        }
    }
}

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_chunked_body_decodes_whole_however_it_is_cut() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for cut in 0..=wire.len() {
            let mut body = Body::new(Framing::Chunked);
            let (mut buf, mut out) = (Vec::new(), Vec::new());
            for part in [&wire[..cut], &wire[cut..]] {
                buf.extend_from_slice(part);
                body.decode(&mut buf, |d| out.extend_from_slice(d)).unwrap();
            }
            assert!(body.done(), "cut at {cut}");
            assert!(buf.is_empty(), "cut at {cut}");
            assert_eq!(out, b"hello world", "cut at {cut}");
        }
    }

    #[test]
    fn a_length_body_stops_at_its_length_and_bad_chunks_are_errors() {
        let mut body = Body::new(Framing::Length(3));
        let (mut buf, mut out) = (b"abcdef".to_vec(), Vec::new());
        body.decode(&mut buf, |d| out.extend_from_slice(d)).unwrap();
        assert!(body.done());
        assert_eq!((out.as_slice(), buf.as_slice()), (&b"abc"[..], &b"def"[..]));
        let mut bad = Body::new(Framing::Chunked);
        assert!(bad.decode(&mut b"zz\r\n".to_vec(), |_| {}).is_err());
    }

    #[test]
    fn heads_skip_interim_answers_and_say_whether_the_connection_stays() {
        let mut buf =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
        assert_eq!(
            parse_head(&mut buf),
            Ok(Some((200, Framing::Length(2), true)))
        );
        assert_eq!(buf, b"ok");
        let mut partial = b"HTTP/1.1 200 OK\r\nContent-Len".to_vec();
        assert_eq!(parse_head(&mut partial), Ok(None));
        for (head, want) in [
            (
                &b"HTTP/1.1 503 x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"[..],
                (503, Framing::Length(0), false),
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                (200, Framing::Length(1), false),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                (200, Framing::Chunked, true),
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", (200, Framing::UntilClose, true)),
            (
                b"HTTP/1.1 204 No Content\r\n\r\n",
                (204, Framing::Length(0), true),
            ),
        ] {
            assert_eq!(
                parse_head(&mut head.to_vec()),
                Ok(Some(want)),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert!(parse_head(&mut b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n".to_vec()).is_err());
    }

    #[test]
    fn finds_text_split_across_chunks() {
        let mut scan = Scan::new(b"estimation");
        for chunk in [&b"{\"msg\":\"es"[..], b"ti", b"mat", b"ion\"}"] {
            scan.feed(chunk);
        }
        assert!(scan.found());
    }

    proptest! {
        #[test]
        fn chunked_search_agrees_with_a_search_of_the_first_64_kib(
            body in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 0..300),
            needle in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b')], 1..6),
            cuts in proptest::collection::vec(0usize..300, 0..10),
            padding in prop_oneof![Just(0usize), Just(MAX_BODY_SCAN - 150)],
        ) {
            let mut body_padded = vec![b'x'; padding];
            body_padded.extend_from_slice(&body);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| padding + c.min(body.len())).collect();
            cuts.push(0);
            cuts.push(body_padded.len());
            cuts.sort_unstable();
            let mut scan = Scan::new(&needle);
            for pair in cuts.windows(2) {
                if scan.found() || scan.exhausted() {
                    break;
                }
                scan.feed(&body_padded[pair[0]..pair[1]]);
            }
            let limit = body_padded.len().min(MAX_BODY_SCAN);
            prop_assert_eq!(scan.found(), contains(&body_padded[..limit], &needle));
        }
    }
}

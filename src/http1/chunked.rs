//! Incremental scanner for the HTTP/1.1 chunked transfer coding (RFC 9112 §7.1).
//!
//! The proxy forwards chunked bodies verbatim, so the scanner never copies: it finds where the
//! body ends, counts payload bytes against size limits and, when asked, reports where the chunk
//! data lies so a caller can decode for HTTP/1.0 clients. Its state is a few words, so the
//! input may be split anywhere, down to one byte per call.
//!
//! Leniency follows nginx: a bare LF ends a line, but a CR must be followed by LF. Chunk
//! extensions and trailer fields are skipped, not interpreted; only their size is bounded.

use std::fmt;
use std::ops::Range;

/// Longest chunk-size line, extensions included, line ending excluded.
const MAX_SIZE_LINE: usize = 4096;
/// 16 hex digits hold any u64, so this is also the overflow check. Leading zeros count too:
/// a sender has no reason to pad further, and the bound keeps the digit loop trivial.
const MAX_SIZE_DIGITS: u8 = 16;
/// Largest trailer section: its field lines with their line endings, not the final empty line.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    /// A chunk-size line that is not hex, too long (more than 16 hex digits or the line over 4096 bytes incl. extensions), or overflows u64.
    BadSize,
    /// Missing CRLF after chunk data, or malformed line endings.
    BadFraming,
    /// Trailer section over 16 KiB.
    TrailersTooLarge,
}

impl fmt::Display for ChunkedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkedError::BadSize => "invalid chunk size line",
            ChunkedError::BadFraming => "invalid chunked framing",
            ChunkedError::TrailersTooLarge => "chunked trailer section too large",
        })
    }
}

impl std::error::Error for ChunkedError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the chunk-size digits.
    Size,
    /// Whitespace after the digits: only more of it, `;` or the line end may follow.
    SizeWs,
    /// In chunk extensions, up to the line end.
    Ext,
    /// CR seen on the chunk-size line.
    SizeLf,
    /// In chunk data; `size` bytes remain.
    Data,
    /// Chunk data ended; its line ending must follow.
    DataEnd,
    /// CR seen after chunk data.
    DataLf,
    /// At the start of a trailer field line or of the final empty line.
    TrailerStart,
    /// In a trailer field line.
    Trailer,
    /// CR seen at the end of a trailer field line.
    TrailerLf,
    /// CR seen on the final empty line.
    EndLf,
    Done,
    /// Sticky, so a caller that ignores an error cannot resume in the middle of garbage.
    Failed(ChunkedError),
}

/// Incremental parser for a chunked body. Feed it the bytes as they arrive, in any split.
#[derive(Debug, Clone)]
pub struct ChunkedScanner {
    state: State,
    /// The chunk size while its line is parsed, then the chunk-data bytes still to come.
    size: u64,
    payload_len: u64,
    /// Bytes of the current chunk-size line so far.
    line_len: usize,
    /// Bytes of the trailer section so far.
    trailer_len: usize,
    digits: u8,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedScanner {
    pub fn new() -> Self {
        ChunkedScanner { state: State::Size, size: 0, payload_len: 0, line_len: 0, trailer_len: 0, digits: 0 }
    }

    /// Scan `input` (the next bytes of the body). Returns how many bytes of `input` belong to the
    /// chunked body: all of them unless the body ends inside `input` (then the count stops right
    /// after the final CRLF of the trailer section, and is_done() becomes true). When `payload` is
    /// Some, pushes the ranges (relative to `input`, in order, non-empty) that are chunk data.
    /// After is_done(), scan returns Ok(0).
    pub fn scan(&mut self, input: &[u8], payload: Option<&mut Vec<Range<usize>>>) -> Result<usize, ChunkedError> {
        let result = self.run(input, payload);
        if let Err(e) = result {
            self.state = State::Failed(e);
        }
        result
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Chunk-data bytes seen so far.
    pub fn payload_len(&self) -> u64 {
        self.payload_len
    }

    fn run(&mut self, input: &[u8], mut payload: Option<&mut Vec<Range<usize>>>) -> Result<usize, ChunkedError> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        let len = input.len();
        let mut i = 0;
        while i < len {
            let b = input[i];
            match self.state {
                // Data, extensions and trailer lines are skipped in bulk; only the short framing
                // lines go byte by byte.
                State::Data => {
                    let n = self.size.min((len - i) as u64) as usize;
                    if let Some(ranges) = payload.as_mut() {
                        ranges.push(i..i + n);
                    }
                    i += n;
                    self.size -= n as u64;
                    self.payload_len += n as u64;
                    if self.size == 0 {
                        self.state = State::DataEnd;
                    }
                }
                State::Ext => {
                    // Quoted strings cannot hold CR or LF, so the first one ends the line. The
                    // search stops one byte past the limit, so a huge line costs no more than that.
                    let budget = MAX_SIZE_LINE - self.line_len;
                    let window = &input[i..len.min(i + budget + 1)];
                    match find_line_end(window) {
                        Some(n) if n <= budget => {
                            i += n + 1;
                            if window[n] == b'\r' {
                                self.state = State::SizeLf;
                            } else {
                                self.end_size_line();
                            }
                        }
                        None if window.len() <= budget => {
                            self.line_len += window.len();
                            i = len;
                        }
                        _ => return Err(ChunkedError::BadSize),
                    }
                }
                State::Trailer => {
                    // As for extensions, but the line ending counts towards the limit.
                    let budget = MAX_TRAILERS - self.trailer_len;
                    let window = &input[i..len.min(i + budget + 1)];
                    match find_line_end(window) {
                        Some(n) if n < budget => {
                            self.trailer_len += n + 1;
                            i += n + 1;
                            self.state = if window[n] == b'\r' { State::TrailerLf } else { State::TrailerStart };
                        }
                        None if window.len() <= budget => {
                            self.trailer_len += window.len();
                            i = len;
                        }
                        _ => return Err(ChunkedError::TrailersTooLarge),
                    }
                }
                State::Size => {
                    i += 1;
                    if let Some(d) = hex_value(b) {
                        if self.digits == MAX_SIZE_DIGITS {
                            return Err(ChunkedError::BadSize);
                        }
                        self.size = self.size << 4 | u64::from(d);
                        self.digits += 1;
                        self.line_len += 1;
                    } else if self.digits == 0 {
                        return Err(ChunkedError::BadSize);
                    } else {
                        self.after_digits(b)?;
                    }
                }
                State::SizeWs => {
                    i += 1;
                    self.after_digits(b)?;
                }
                State::SizeLf => {
                    i += 1;
                    if b != b'\n' {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.end_size_line();
                }
                State::DataEnd => {
                    i += 1;
                    match b {
                        b'\r' => self.state = State::DataLf,
                        b'\n' => self.state = State::Size,
                        _ => return Err(ChunkedError::BadFraming),
                    }
                }
                State::DataLf => {
                    i += 1;
                    if b != b'\n' {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    i += 1;
                    match b {
                        b'\r' => self.state = State::EndLf,
                        b'\n' => self.state = State::Done,
                        _ => {
                            self.trailer_len += 1;
                            if self.trailer_len > MAX_TRAILERS {
                                return Err(ChunkedError::TrailersTooLarge);
                            }
                            self.state = State::Trailer;
                        }
                    }
                }
                State::TrailerLf => {
                    i += 1;
                    if b != b'\n' {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.trailer_len += 1;
                    if self.trailer_len > MAX_TRAILERS {
                        return Err(ChunkedError::TrailersTooLarge);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    i += 1;
                    if b != b'\n' {
                        return Err(ChunkedError::BadFraming);
                    }
                    self.state = State::Done;
                }
                // The body ended before `i`: the rest of `input` is the next message.
                State::Done => return Ok(i),
                State::Failed(e) => return Err(e),
            }
        }
        Ok(len)
    }

    /// A byte after the chunk-size digits (or the whitespace following them).
    fn after_digits(&mut self, b: u8) -> Result<(), ChunkedError> {
        match b {
            b' ' | b'\t' | b';' => {
                self.line_len += 1;
                if self.line_len > MAX_SIZE_LINE {
                    return Err(ChunkedError::BadSize);
                }
                self.state = if b == b';' { State::Ext } else { State::SizeWs };
            }
            b'\r' => self.state = State::SizeLf,
            b'\n' => self.end_size_line(),
            _ => return Err(ChunkedError::BadSize),
        }
        Ok(())
    }

    fn end_size_line(&mut self) {
        self.digits = 0;
        self.line_len = 0;
        // `size` is left for Data to count down; it reaches 0 again before the next size line.
        self.state = if self.size == 0 { State::TrailerStart } else { State::Data };
    }
}

#[inline]
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[inline]
fn find_line_end(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\r' || b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What scanning produced: the payload bytes, the bytes consumed, and whether the body ended.
    type Outcome = Result<(Vec<u8>, usize, bool), ChunkedError>;

    /// Feeds `pieces` in order to one scanner, checking the invariants of each call's result.
    fn feed(pieces: &[&[u8]], collect: bool) -> Outcome {
        let mut s = ChunkedScanner::new();
        let mut data = Vec::new();
        let mut consumed = 0;
        for piece in pieces {
            let mut ranges = Vec::new();
            let n = s.scan(piece, collect.then_some(&mut ranges))?;
            assert!(n == piece.len() || (n < piece.len() && s.is_done()), "consumed {n} of {}", piece.len());
            let mut last = 0;
            for r in ranges {
                assert!(!r.is_empty() && r.start >= last && r.end <= n, "bad range {r:?}");
                last = r.end;
                data.extend_from_slice(&piece[r]);
            }
            consumed += n;
        }
        if collect {
            assert_eq!(s.payload_len(), data.len() as u64);
        }
        Ok((data, consumed, s.is_done()))
    }

    fn bytewise(body: &[u8]) -> Outcome {
        let pieces: Vec<&[u8]> = body.chunks(1).collect();
        feed(&pieces, true)
    }

    /// The one-call outcome, after checking that every 2-way split and byte-by-byte agree with it.
    fn check_splits(body: &[u8]) -> Outcome {
        let whole = feed(&[body], true);
        for k in 0..=body.len() {
            assert_eq!(feed(&[&body[..k], &body[k..]], true), whole, "split at {k}");
        }
        assert_eq!(bytewise(body), whole, "byte by byte");
        let without = feed(&[body], false).map(|(_, n, done)| (n, done));
        assert_eq!(without, whole.as_ref().map(|(_, n, done)| (*n, *done)).map_err(|e| *e), "payload None");
        whole
    }

    fn ok(data: &[u8], consumed: usize) -> Outcome {
        Ok((data.to_vec(), consumed, true))
    }

    const SIMPLE: &[u8] = b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";

    #[test]
    fn simple_body_in_one_call() {
        let mut s = ChunkedScanner::new();
        let mut ranges = Vec::new();
        assert_eq!(s.scan(SIMPLE, Some(&mut ranges)), Ok(SIMPLE.len()));
        assert!(s.is_done());
        assert_eq!(ranges, vec![3..7, 12..17]);
        assert_eq!(s.payload_len(), 9);
    }

    #[test]
    fn every_split_agrees() {
        assert_eq!(check_splits(SIMPLE), ok(b"Wikipedia", SIMPLE.len()));

        // Every feature at once, data that looks like framing, and a pipelined request after.
        let body: &[u8] = b"3 ;a=1;q=\"x;\\\"y\\\"\"\r\n0\r\n\r\nA\n0123456789\r\n1f;e\r\n\
            abcdefghijklmnopqrstuvwxyz01234\n0;last\r\nExpires: never\r\nX-Sum: 1\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        assert_eq!(check_splits(&input), ok(b"0\r\n0123456789abcdefghijklmnopqrstuvwxyz01234", body.len()));

        // Three pieces, every way, on the short body.
        for j in 0..=SIMPLE.len() {
            for k in j..=SIMPLE.len() {
                let pieces = [&SIMPLE[..j], &SIMPLE[j..k], &SIMPLE[k..]];
                assert_eq!(feed(&pieces, true), ok(b"Wikipedia", SIMPLE.len()), "split at {j}, {k}");
            }
        }
    }

    #[test]
    fn leaves_the_pipelined_request() {
        let mut input = SIMPLE.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let mut s = ChunkedScanner::new();
        assert_eq!(s.scan(&input, None), Ok(SIMPLE.len()));
        assert!(s.is_done());
        assert_eq!(s.scan(&input[SIMPLE.len()..], None), Ok(0));
    }

    #[test]
    fn extensions_are_skipped() {
        let body = b"5;foo=bar\r\nhello\r\n6 \t; a = \"x;y\\\"z\" ; b\r\n world\r\n0;last=\"1\"\r\n\r\n";
        assert_eq!(check_splits(body), ok(b"hello world", body.len()));
        // Whitespace may also end the line without an extension.
        assert_eq!(check_splits(b"1 \r\nx\r\n0\r\n\r\n"), ok(b"x", 12));
        assert_eq!(check_splits(b"1 x\r\nx\r\n0\r\n\r\n"), Err(ChunkedError::BadSize));
    }

    #[test]
    fn size_line_limit() {
        let line = |ext_len: usize| {
            let mut b = b"1;".to_vec();
            b.resize(2 + ext_len, b'e');
            b.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
            b
        };
        let longest = line(MAX_SIZE_LINE - 2);
        assert_eq!(feed(&[&longest], true), ok(b"x", longest.len()));
        assert_eq!(bytewise(&longest), ok(b"x", longest.len()));
        let over = line(MAX_SIZE_LINE - 1);
        assert_eq!(feed(&[&over], true), Err(ChunkedError::BadSize));
        assert_eq!(bytewise(&over), Err(ChunkedError::BadSize));
        // Over-long whitespace is caught as well.
        let mut spaces = b"1".to_vec();
        spaces.resize(MAX_SIZE_LINE + 1, b' ');
        assert_eq!(bytewise(&spaces), Err(ChunkedError::BadSize));
    }

    #[test]
    fn trailers() {
        let body = b"2\r\nhi\r\n0\r\nExpires: never\r\nX-Checksum: abc\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"POST");
        assert_eq!(check_splits(&input), ok(b"hi", body.len()));
    }

    #[test]
    fn trailer_limit() {
        let with_trailers = |len: usize| {
            let mut b = b"0\r\nX: ".to_vec();
            b.resize(3 + len - 2, b'a');
            b.extend_from_slice(b"\r\n\r\n");
            b
        };
        let largest = with_trailers(MAX_TRAILERS);
        assert_eq!(feed(&[&largest], true), ok(b"", largest.len()));
        assert_eq!(bytewise(&largest), ok(b"", largest.len()));
        let over = with_trailers(MAX_TRAILERS + 1);
        assert_eq!(feed(&[&over], true), Err(ChunkedError::TrailersTooLarge));
        assert_eq!(bytewise(&over), Err(ChunkedError::TrailersTooLarge));
        // Many short lines add up.
        let mut many = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILERS / 6 + 1 {
            many.extend_from_slice(b"A: b\r\n");
        }
        assert_eq!(feed(&[&many], true), Err(ChunkedError::TrailersTooLarge));
    }

    #[test]
    fn uppercase_and_mixed_hex() {
        let mut body = b"A\r\n0123456789\r\n1F\r\n".to_vec();
        body.extend_from_slice(&[b'x'; 31]);
        body.extend_from_slice(b"\r\n00aB\r\n");
        body.extend_from_slice(&[b'y'; 0xab]);
        body.extend_from_slice(b"\r\n0\r\n\r\n");
        let mut expected = b"0123456789".to_vec();
        expected.extend_from_slice(&[b'x'; 31]);
        expected.extend_from_slice(&[b'y'; 0xab]);
        assert_eq!(check_splits(&body), ok(&expected, body.len()));
    }

    #[test]
    fn bare_lf_line_endings() {
        assert_eq!(check_splits(b"4\nWiki\n0\n\n"), ok(b"Wiki", 10));
        assert_eq!(check_splits(b"4;e\nWiki\r\n0\r\nT: 1\n\r\nnext"), ok(b"Wiki", 20));
    }

    #[test]
    fn bad_sizes() {
        for body in
            [&b"g\r\n"[..], b"\r\nx", b";ext\r\n", b"-1\r\n", b"0x5\r\n", b" 5\r\n", b"5\x00\r\n", b"4\r\nWiki\r\n\r\n"]
        {
            assert_eq!(check_splits(body), Err(ChunkedError::BadSize), "{body:?}");
        }
    }

    #[test]
    fn size_overflow() {
        // The largest u64 is fine; the body is just unfinished.
        let mut s = ChunkedScanner::new();
        assert_eq!(s.scan(b"FFFFFFFFFFFFFFFF\r\nabc", None), Ok(21));
        assert!(!s.is_done());
        assert_eq!(s.payload_len(), 3);
        // A 17th digit is refused even when it would not overflow.
        assert_eq!(check_splits(b"10000000000000000\r\n"), Err(ChunkedError::BadSize));
        assert_eq!(check_splits(b"00000000000000001\r\n"), Err(ChunkedError::BadSize));
    }

    #[test]
    fn bad_framing() {
        for body in [
            // Missing or wrong line ending after the data.
            &b"4\r\nWikiX\r\n0\r\n\r\n"[..],
            b"4\r\nWiki0\r\n\r\n",
            b"4\r\nWiki\r\r\n0\r\n\r\n",
            // A CR not followed by LF, wherever it is.
            b"4\rWiki",
            b"4;ext\r\r\n",
            b"0\r\nA: b\rc\r\n\r\n",
            b"0\r\n\rx",
            b"0\r\n\r\r\n",
        ] {
            assert_eq!(check_splits(body), Err(ChunkedError::BadFraming), "{body:?}");
        }
    }

    #[test]
    fn payload_len_counts_large_chunks_across_calls() {
        let mut body = b"10000\r\n".to_vec();
        body.resize(body.len() + 0x10000, b'z');
        body.extend_from_slice(b"\r\n0\r\n\r\n");
        let mut s = ChunkedScanner::new();
        let mut ranges = Vec::new();
        let mut consumed = 0;
        for (k, piece) in body.chunks(1000).enumerate() {
            ranges.clear();
            consumed += s.scan(piece, Some(&mut ranges)).unwrap();
            if k == 10 {
                assert_eq!(s.payload_len(), 11_000 - 7);
            }
            // Data spans whole pieces as one range each, not byte by byte.
            assert!(ranges.len() <= 1);
        }
        assert_eq!(consumed, body.len());
        assert!(s.is_done());
        assert_eq!(s.payload_len(), 0x10000);
    }

    #[test]
    fn scan_after_done_returns_zero() {
        let mut s = ChunkedScanner::default();
        assert_eq!(s.scan(b"", None), Ok(0));
        assert_eq!(s.scan(b"0\r\n\r\n", None), Ok(5));
        assert!(s.is_done());
        let mut ranges = Vec::new();
        assert_eq!(s.scan(b"5\r\nhello\r\n0\r\n\r\n", Some(&mut ranges)), Ok(0));
        assert_eq!(s.scan(b"", None), Ok(0));
        assert!(ranges.is_empty());
        assert_eq!(s.payload_len(), 0);
    }

    #[test]
    fn errors_are_sticky() {
        let mut s = ChunkedScanner::new();
        assert_eq!(s.scan(b"zz", None), Err(ChunkedError::BadSize));
        assert_eq!(s.scan(b"0\r\n\r\n", None), Err(ChunkedError::BadSize));
        assert_eq!(s.scan(b"", None), Err(ChunkedError::BadSize));
        assert!(!s.is_done());
        assert_eq!(ChunkedError::BadFraming.to_string(), "invalid chunked framing");
    }
}

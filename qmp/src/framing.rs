//! Stream framing: turns the bytes of a QMP connection into JSON values.
//!
//! A client may send any number of JSON objects in one write, split an object across writes,
//! and put whitespace or newlines between objects. The decoder runs an incremental JSON
//! syntax checker over the stream, so it knows where each value ends without waiting for a
//! newline, notices a syntax error at the byte where it happens, and never holds more than
//! `max_object_bytes` of one value. After an error it skips input up to the next `{`, which is
//! where the next command can begin, so one bad line does not poison the connection (QEMU's
//! lexer likewise resets on error; a client can force a resynchronisation by sending a byte
//! that is never valid UTF-8, such as 0xFF, followed by its next command).
//!
//! Like QEMU, the decoder also accepts single-quoted strings (`{'execute':'stop'}`), which
//! are handy when typing commands by hand; they are rewritten to standard JSON as they are
//! buffered.

use serde_json::Value;

/// Deepest nesting of objects and arrays accepted; serde_json refuses deeper documents too.
const MAX_DEPTH: usize = 128;

/// Why a value could not be taken from the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The input is not valid JSON; the text says what was wrong, in QEMU's style.
    #[error("{0}")]
    Malformed(String),
    /// The value grew beyond the decoder's limit and was discarded.
    #[error("JSON parse error, object exceeds the size limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

/// What the syntax checker accepts next, outside of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Any value (top level, after `:` or after `,` in an array).
    Value,
    /// A value or `]` (just after `[`).
    ValueOrClose,
    /// A key or `}` (just after `{`).
    KeyOrClose,
    /// A key (after `,` in an object).
    Key,
    /// `:` after a key.
    Colon,
    /// `,` or the closing bracket of the innermost container.
    CommaOrClose,
}

/// State inside a string escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// Hex digits of a `\u` escape still to come.
    Hex(u8),
}

/// The token being scanned, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    None,
    /// A string delimited by `quote` (`"` or `'`); it is a key when `expect` asks for one,
    /// since `expect` only moves on once the string ends.
    Str {
        quote: u8,
        escape: Escape,
    },
    /// Digits, sign, dot and exponent; serde_json checks the exact number grammar.
    Number,
    /// `true`, `false` or `null`, collected letter by letter.
    Literal {
        word: [u8; 5],
        len: u8,
    },
}

/// Where the decoder is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between values.
    Idle,
    /// Inside a value that is being buffered.
    Value,
    /// Inside a value that exceeded the limit: followed to its end, not buffered.
    Oversized,
    /// After a syntax error: skipping to the next `{`.
    Recovering,
}

/// The bytes to buffer for the byte just scanned: usually the byte itself, but single-quoted
/// strings are rewritten into double-quoted ones on the way in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Emit {
    bytes: [u8; 2],
    len: u8,
}

impl Emit {
    const NOTHING: Emit = Emit {
        bytes: [0; 2],
        len: 0,
    };

    fn one(b: u8) -> Self {
        Emit {
            bytes: [b, 0],
            len: 1,
        }
    }

    fn two(a: u8, b: u8) -> Self {
        Emit {
            bytes: [a, b],
            len: 2,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Result of feeding one byte to the syntax checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The value continues.
    More,
    /// The value ends with this byte.
    Done,
    /// The value ended just before this byte (a number or keyword at top level); the byte
    /// belongs to whatever follows.
    DoneBefore,
}

/// Incremental decoder for a stream of JSON values, bounded in memory.
#[derive(Debug)]
pub struct Decoder {
    limit: usize,
    mode: Mode,
    expect: Expect,
    token: Token,
    /// Open containers, `{` or `[`, innermost last.
    stack: Vec<u8>,
    /// What the last scanned byte contributes to `buf`.
    emit: Emit,
    buf: Vec<u8>,
}

impl Decoder {
    /// A decoder that refuses values longer than `max_object_bytes` bytes.
    pub fn new(max_object_bytes: usize) -> Self {
        Decoder {
            limit: max_object_bytes,
            mode: Mode::Idle,
            expect: Expect::Value,
            token: Token::None,
            stack: Vec::new(),
            emit: Emit::NOTHING,
            buf: Vec::new(),
        }
    }

    /// Feeds bytes read from the connection; returns every value (or error) they complete,
    /// in stream order. Incomplete input is kept for the next call.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, FrameError>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some((&b, after)) = rest.split_first() {
            let plain = self.plain_string_run(rest);
            if plain > 0 {
                self.buf.extend_from_slice(&rest[..plain]);
                rest = &rest[plain..];
                continue;
            }
            self.step(b, &mut out);
            rest = after;
        }
        out
    }

    /// How many leading bytes of `bytes` are ordinary characters of the string being buffered,
    /// which the byte-wise scanner would only copy: no quote, backslash, control character or
    /// byte that never occurs in UTF-8, and no more than the limit leaves room for (the byte
    /// that would overflow it goes through the scanner, which reports it). Most of a command is
    /// strings; taking them a run at a time spares the scanner's per-byte work.
    fn plain_string_run(&self, bytes: &[u8]) -> usize {
        let Token::Str {
            quote,
            escape: Escape::None,
        } = self.token
        else {
            return 0;
        };
        if self.mode != Mode::Value {
            return 0;
        }
        let room = self.limit.saturating_sub(self.buf.len());
        let bytes = &bytes[..bytes.len().min(room)];
        bytes
            .iter()
            .position(|&b| {
                b == quote || matches!(b, b'"' | b'\\' | 0..=0x1f | 0xc0 | 0xc1 | 0xf5..=0xff)
            })
            .unwrap_or(bytes.len())
    }

    /// True while part of a value has been seen but not its end.
    pub fn in_value(&self) -> bool {
        matches!(self.mode, Mode::Value | Mode::Oversized)
    }

    fn step(&mut self, b: u8, out: &mut Vec<Result<Value, FrameError>>) {
        if self.mode == Mode::Recovering {
            if b != b'{' {
                return;
            }
            self.mode = Mode::Idle;
        }
        if self.mode == Mode::Idle {
            if is_whitespace(b) {
                return;
            }
            // The one place per-value state is reset: finishing or abandoning a value only
            // changes `mode`, and every path back to a value passes through here.
            self.mode = Mode::Value;
            self.expect = Expect::Value;
            self.token = Token::None;
            self.stack.clear();
            self.buf.clear();
        }
        match self.scan(b) {
            Ok(Step::More) => self.keep(out),
            Ok(Step::Done) => {
                self.keep(out);
                self.finish(out);
            }
            Ok(Step::DoneBefore) => {
                self.finish(out);
                self.step(b, out);
            }
            Err(msg) => {
                // An oversized value was already reported; one error per bad value is enough.
                if self.mode == Mode::Value {
                    out.push(Err(FrameError::Malformed(msg)));
                }
                self.mode = Mode::Recovering;
                // The offending byte may itself be the start of the next command.
                self.step(b, out);
            }
        }
    }

    /// Buffers what the scanned byte contributes to the current value, or switches to
    /// discarding the value once it is too big.
    fn keep(&mut self, out: &mut Vec<Result<Value, FrameError>>) {
        if self.mode != Mode::Value {
            return;
        }
        let emit = self.emit;
        if self.buf.len() + emit.as_slice().len() > self.limit {
            out.push(Err(FrameError::TooLarge { limit: self.limit }));
            self.mode = Mode::Oversized;
            // Give the memory back: an oversized value must not pin the limit's worth of heap.
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(emit.as_slice());
    }

    /// Ends the current value and hands it over, unless it was discarded as oversized.
    fn finish(&mut self, out: &mut Vec<Result<Value, FrameError>>) {
        if self.mode == Mode::Value {
            out.push(
                serde_json::from_slice(&self.buf)
                    .map_err(|e| FrameError::Malformed(format!("JSON parse error, {e}"))),
            );
        }
        self.mode = Mode::Idle;
    }

    /// Advances the syntax checker by one byte of a value.
    fn scan(&mut self, b: u8) -> Result<Step, String> {
        self.emit = Emit::one(b);
        match self.token {
            Token::Str { quote, escape } => return self.scan_string(b, quote, escape),
            Token::Number => {
                if matches!(b, b'0'..=b'9' | b'+' | b'-' | b'.' | b'e' | b'E') {
                    return Ok(Step::More);
                }
                self.token = Token::None;
                if self.value_end() == Step::Done {
                    return Ok(Step::DoneBefore);
                }
            }
            Token::Literal { mut word, len } => {
                if b.is_ascii_alphanumeric() {
                    let len = usize::from(len);
                    if len == word.len() {
                        return Err(format!(
                            "JSON parse error, invalid keyword '{}...'",
                            String::from_utf8_lossy(&word)
                        ));
                    }
                    word[len] = b;
                    self.token = Token::Literal {
                        word,
                        len: len as u8 + 1,
                    };
                    return Ok(Step::More);
                }
                let word = &word[..usize::from(len)];
                if !matches!(word, b"true" | b"false" | b"null") {
                    return Err(format!(
                        "JSON parse error, invalid keyword '{}'",
                        String::from_utf8_lossy(word)
                    ));
                }
                self.token = Token::None;
                if self.value_end() == Step::Done {
                    return Ok(Step::DoneBefore);
                }
            }
            Token::None => {}
        }
        if is_whitespace(b) {
            return Ok(Step::More);
        }
        let top = self.stack.last().copied();
        match (self.expect, b) {
            (Expect::Value | Expect::ValueOrClose, b'{') => {
                self.open(b)?;
                self.expect = Expect::KeyOrClose;
            }
            (Expect::Value | Expect::ValueOrClose, b'[') => {
                self.open(b)?;
                self.expect = Expect::ValueOrClose;
            }
            (Expect::Value | Expect::ValueOrClose, b'-' | b'0'..=b'9') => {
                self.token = Token::Number;
            }
            (Expect::Value | Expect::ValueOrClose, b't' | b'f' | b'n') => {
                let mut word = [0u8; 5];
                word[0] = b;
                self.token = Token::Literal { word, len: 1 };
            }
            (Expect::ValueOrClose, b']') => {
                self.stack.pop();
                return Ok(self.value_end());
            }
            (Expect::KeyOrClose, b'}') => {
                self.stack.pop();
                return Ok(self.value_end());
            }
            (Expect::CommaOrClose, b']') if top == Some(b'[') => {
                self.stack.pop();
                return Ok(self.value_end());
            }
            (Expect::CommaOrClose, b'}') if top == Some(b'{') => {
                self.stack.pop();
                return Ok(self.value_end());
            }
            (
                Expect::Value | Expect::ValueOrClose | Expect::KeyOrClose | Expect::Key,
                b'"' | b'\'',
            ) => {
                self.token = Token::Str {
                    quote: b,
                    escape: Escape::None,
                };
                self.emit = Emit::one(b'"');
            }
            (Expect::Colon, b':') => self.expect = Expect::Value,
            (Expect::CommaOrClose, b',') => {
                self.expect = if top == Some(b'{') {
                    Expect::Key
                } else {
                    Expect::Value
                };
            }
            (expect, _) => {
                let what = match expect {
                    Expect::Value | Expect::ValueOrClose => "expecting value",
                    Expect::KeyOrClose | Expect::Key => "key is not a string in object",
                    Expect::Colon => "missing : in object pair",
                    Expect::CommaOrClose if top == Some(b'{') => "expected separator in object",
                    Expect::CommaOrClose => "expected separator in array",
                };
                return Err(format!("JSON parse error, {what}, found {}", show(b)));
            }
        }
        Ok(Step::More)
    }

    fn scan_string(&mut self, b: u8, quote: u8, escape: Escape) -> Result<Step, String> {
        let escape = match escape {
            Escape::None => match b {
                _ if b == quote => {
                    self.emit = Emit::one(b'"');
                    self.token = Token::None;
                    if matches!(self.expect, Expect::Key | Expect::KeyOrClose) {
                        self.expect = Expect::Colon;
                        return Ok(Step::More);
                    }
                    return Ok(self.value_end());
                }
                b'\\' => {
                    // Written once the escaped character shows whether it needs rewriting.
                    self.emit = Emit::NOTHING;
                    Escape::Backslash
                }
                b'"' => {
                    // Only reached inside a single-quoted string.
                    self.emit = Emit::two(b'\\', b'"');
                    Escape::None
                }
                0..=0x1f => {
                    return Err(format!(
                        "JSON parse error, control character {} in string",
                        show(b)
                    ))
                }
                // Bytes that never occur in UTF-8. Refusing them even inside a string makes
                // 0xFF a reliable way for a client to resynchronise, as with QEMU's lexer.
                0xc0 | 0xc1 | 0xf5..=0xff => {
                    return Err(format!(
                        "JSON parse error, invalid UTF-8 {} in string",
                        show(b)
                    ))
                }
                _ => Escape::None,
            },
            Escape::Backslash => match b {
                b'\'' => Escape::None,
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                    self.emit = Emit::two(b'\\', b);
                    Escape::None
                }
                b'u' => {
                    self.emit = Emit::two(b'\\', b);
                    Escape::Hex(4)
                }
                _ => {
                    return Err(format!(
                        "JSON parse error, invalid escape sequence in string, found {}",
                        show(b)
                    ))
                }
            },
            Escape::Hex(left) => {
                if !b.is_ascii_hexdigit() {
                    return Err(format!(
                        "JSON parse error, invalid \\u escape in string, found {}",
                        show(b)
                    ));
                }
                if left == 1 {
                    Escape::None
                } else {
                    Escape::Hex(left - 1)
                }
            }
        };
        self.token = Token::Str { quote, escape };
        Ok(Step::More)
    }

    fn open(&mut self, bracket: u8) -> Result<(), String> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(format!(
                "JSON parse error, nesting deeper than {MAX_DEPTH} levels"
            ));
        }
        self.stack.push(bracket);
        Ok(())
    }

    /// A complete value (not a key) was scanned.
    fn value_end(&mut self) -> Step {
        if self.stack.is_empty() {
            Step::Done
        } else {
            self.expect = Expect::CommaOrClose;
            Step::More
        }
    }
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// A byte for an error message: the character if printable, its value otherwise.
fn show(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound on memory holds however much of a string one read brings: the buffer never
    /// grows past the limit, and the value is refused once it would.
    #[test]
    fn a_string_read_whole_never_buffers_past_the_limit() {
        let input = format!("{{\"execute\":\"{}\"}}", "x".repeat(300));
        for limit in 1..input.len() + 2 {
            let mut d = Decoder::new(limit);
            let mut got = Vec::new();
            for chunk in input.as_bytes().chunks(97) {
                got.extend(d.feed(chunk));
                assert!(
                    d.buf.len() <= limit,
                    "limit {limit}: {} buffered",
                    d.buf.len()
                );
            }
            let expected = if limit >= input.len() {
                Ok(serde_json::from_str(&input).unwrap())
            } else {
                Err(FrameError::TooLarge { limit })
            };
            assert_eq!(got, vec![expected], "limit {limit}");
        }
    }
}

//! Stream framing: splits, batching, resynchronisation and the size bound.

use citadel_qmp::framing::{Decoder, FrameError};
use serde_json::{json, Value};

const LIMIT: usize = 4096;

/// Feeds `chunks` in order and collects everything the decoder yields.
fn decode_chunks(decoder: &mut Decoder, chunks: &[&[u8]]) -> Vec<Result<Value, FrameError>> {
    chunks.iter().flat_map(|c| decoder.feed(c)).collect()
}

fn decode(input: &[u8]) -> Vec<Result<Value, FrameError>> {
    Decoder::new(LIMIT).feed(input)
}

fn malformed(r: &Result<Value, FrameError>) -> bool {
    matches!(r, Err(FrameError::Malformed(_)))
}

const STREAM: &str = concat!(
    "{\"execute\":\"qmp_capabilities\"}",
    "\r\n  {\"execute\": \"query-status\", \"id\": {\"a\": [1, 2, {\"b\": null}]}}\n",
    "{\"execute\":\"x\",\"arguments\":{\"s\":\"br{ace}s [and] \\\"quotes\\\" \\\\\",\"n\":-1.5e3}}",
    "\t{\"k\":\"\\u00e9\\n\",\"t\":true,\"f\":false,\"z\":null,\"e\":[],\"o\":{}}",
    "{'execute':'it\\'s \"quoted\"\\n', \"id\": ['a\\\\b', \"c'd\\'\"]}",
);

fn expected_stream() -> Vec<Value> {
    vec![
        json!({"execute": "qmp_capabilities"}),
        json!({"execute": "query-status", "id": {"a": [1, 2, {"b": null}]}}),
        json!({"execute": "x", "arguments": {"s": "br{ace}s [and] \"quotes\" \\", "n": -1.5e3}}),
        json!({"k": "é\n", "t": true, "f": false, "z": null, "e": [], "o": {}}),
        json!({"execute": "it's \"quoted\"\n", "id": ["a\\b", "c'd'"]}),
    ]
}

fn ok_values(results: Vec<Result<Value, FrameError>>) -> Vec<Value> {
    results
        .into_iter()
        .map(|r| r.expect("every object of the stream decodes"))
        .collect()
}

#[test]
fn many_objects_in_one_read() {
    assert_eq!(ok_values(decode(STREAM.as_bytes())), expected_stream());
}

#[test]
fn every_single_split_decodes_identically() {
    let bytes = STREAM.as_bytes();
    for cut in 0..=bytes.len() {
        let mut d = Decoder::new(LIMIT);
        let got = ok_values(decode_chunks(&mut d, &[&bytes[..cut], &bytes[cut..]]));
        assert_eq!(got, expected_stream(), "split at byte {cut}");
        assert!(!d.in_value(), "nothing pending after split at {cut}");
    }
}

#[test]
fn every_pair_of_splits_decodes_identically() {
    let bytes = STREAM.as_bytes();
    for a in 0..=bytes.len() {
        for b in a..=bytes.len() {
            let mut d = Decoder::new(LIMIT);
            let got = ok_values(decode_chunks(
                &mut d,
                &[&bytes[..a], &bytes[a..b], &bytes[b..]],
            ));
            assert_eq!(got, expected_stream(), "splits at {a} and {b}");
        }
    }
}

#[test]
fn byte_by_byte() {
    let mut d = Decoder::new(LIMIT);
    let mut got = Vec::new();
    for b in STREAM.as_bytes() {
        got.extend(d.feed(std::slice::from_ref(b)));
    }
    assert_eq!(ok_values(got), expected_stream());
}

#[test]
fn incomplete_object_waits_for_more() {
    let mut d = Decoder::new(LIMIT);
    assert!(d.feed(b"{\"execute\": \"st").is_empty());
    assert!(d.in_value());
    assert_eq!(
        ok_values(d.feed(b"op\"}")),
        vec![json!({"execute": "stop"})]
    );
}

#[test]
fn single_quoted_strings_like_qemu() {
    let got = ok_values(decode(
        b"{'execute':'qmp_capabilities'}{'execute': 'stop', 'id': 'a\\'b\\u0041\"'}",
    ));
    assert_eq!(
        got,
        vec![
            json!({"execute": "qmp_capabilities"}),
            json!({"execute": "stop", "id": "a'bA\""}),
        ]
    );
    let got = decode(b"{'execute': 'unterminated\"}\n{'execute':'cont'}");
    assert!(malformed(&got[0]), "{got:?}");
    assert_eq!(got.last().unwrap(), &Ok(json!({"execute": "cont"})));
}

#[test]
fn whitespace_only_yields_nothing() {
    assert!(decode(b" \r\n\t\n  ").is_empty());
}

#[test]
fn deeply_nested_object() {
    let depth = 100;
    let text = "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
    let got = ok_values(decode(text.as_bytes()));
    let mut v = &got[0];
    for _ in 0..depth {
        v = &v["a"];
    }
    assert_eq!(v, &json!(1));
}

#[test]
fn nesting_beyond_the_limit_is_refused_and_next_object_accepted() {
    let text = "[".repeat(200) + "\n{\"execute\":\"cont\"}";
    let got = decode(text.as_bytes());
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(malformed(&got[0]));
    assert_eq!(got[1], Ok(json!({"execute": "cont"})));
}

#[test]
fn malformed_then_valid_command() {
    let cases: &[&[u8]] = &[
        b"{\"execute\" \"stop\"}",
        b"{\"execute\": stop}",
        b"{\"execute\": \"stop\",}",
        b"{execute: 1}",
        b"{\"a\": tru}",
        b"{\"a\": nul1}",
        b"{\"a\": \"\\x\"}",
        b"{\"a\": \"\\u12g4\"}",
        b"{\"a\": \"tab\tinside\"}",
        b"}",
        b"]",
        b":",
        b"\xff",
        b"{\"a\": 1]",
        b"[1}",
        b"{\"a\": 01.2.3}",
        b"{\"a\": -}",
        b"{\"a\": \"\xff\xfe\"}",
        b"{\"a\": 1 \"b\": 2}",
    ];
    for bad in cases {
        let mut input = bad.to_vec();
        input.extend_from_slice(b"\n{\"execute\":\"query-status\",\"id\":7}");
        let got = decode(&input);
        let shown = String::from_utf8_lossy(bad);
        assert!(
            got.len() >= 2,
            "{shown}: expected an error and the command, got {got:?}"
        );
        assert!(malformed(&got[0]), "{shown}: first is an error: {got:?}");
        assert_eq!(
            got.last().unwrap(),
            &Ok(json!({"execute": "query-status", "id": 7})),
            "{shown}: the following command still works"
        );
    }
}

#[test]
fn unterminated_object_is_abandoned_at_the_next_object() {
    // A brace where a comma belongs: the broken object is dropped and the new one decoded.
    let got = decode(b"{\"execute\":\"stop\"{\"execute\":\"cont\"}");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(malformed(&got[0]));
    assert_eq!(got[1], Ok(json!({"execute": "cont"})));
}

#[test]
fn ff_byte_resynchronises_inside_a_string() {
    let got = decode(b"{\"execute\": \"never closed \xff{\"execute\":\"cont\"}");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(malformed(&got[0]));
    assert_eq!(got[1], Ok(json!({"execute": "cont"})));
}

#[test]
fn ff_byte_resynchronises_inside_an_object() {
    let got = decode(b"{\"execute\": \xff {\"execute\":\"cont\"}");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(malformed(&got[0]));
    assert_eq!(got[1], Ok(json!({"execute": "cont"})));
}

#[test]
fn malformed_messages_read_like_qemu() {
    let got = decode(b"{\"execute\" \"stop\"}");
    match &got[0] {
        Err(FrameError::Malformed(msg)) => {
            assert_eq!(
                msg,
                "JSON parse error, missing : in object pair, found '\"'"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    let got = decode(b"}");
    assert_eq!(
        got[0],
        Err(FrameError::Malformed(
            "JSON parse error, expecting value, found '}'".into()
        ))
    );
}

#[test]
fn one_error_per_bad_object() {
    let got = decode(b"{\"a\": [1, 2 3, 4, 5], \"b\": \"c\"}   {\"execute\":\"stop\"}");
    let errors = got.iter().filter(|r| r.is_err()).count();
    assert_eq!(errors, 1, "{got:?}");
    assert_eq!(got.last().unwrap(), &Ok(json!({"execute": "stop"})));
}

#[test]
fn oversized_object_refused_and_next_accepted() {
    let limit = 64;
    let mut d = Decoder::new(limit);
    let big = format!(
        "{{\"execute\":\"x\",\"pad\":\"{}\"}}",
        "y{}[]\\\"".repeat(100)
    );
    let mut input = big.into_bytes();
    input.extend_from_slice(b" {\"execute\":\"stop\",\"id\":1}");
    let got = d.feed(&input);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], Err(FrameError::TooLarge { limit }));
    assert_eq!(got[1], Ok(json!({"execute": "stop", "id": 1})));
}

#[test]
fn oversized_object_split_across_reads_is_reported_once() {
    let limit = 32;
    let mut d = Decoder::new(limit);
    let mut got = Vec::new();
    got.extend(d.feed(b"{\"pad\":\""));
    for _ in 0..1000 {
        got.extend(d.feed(b"0123456789{}[]"));
        assert!(d.in_value());
    }
    got.extend(d.feed(b"\"}{\"execute\":\"cont\"}"));
    assert_eq!(
        got,
        vec![
            Err(FrameError::TooLarge { limit }),
            Ok(json!({"execute": "cont"}))
        ]
    );
}

#[test]
fn object_exactly_at_the_limit_is_accepted() {
    let text = b"{\"execute\":\"stop\"}";
    let got = Decoder::new(text.len()).feed(text);
    assert_eq!(got, vec![Ok(json!({"execute": "stop"}))]);
    let got = Decoder::new(text.len() - 1).feed(text);
    assert_eq!(
        got,
        vec![Err(FrameError::TooLarge {
            limit: text.len() - 1
        })]
    );
}

/// A byte a string may not hold is refused where it occurs, with the scanner's own message,
/// even when the whole string arrives in one read; the next object is unaffected.
#[test]
fn bytes_a_string_may_not_hold_are_refused_in_a_string_read_whole() {
    for (input, what) in [
        (
            &b"{\"s\":\"control\x01char\"} {\"n\":1}"[..],
            "control character byte 0x01",
        ),
        (
            &b"{\"s\":\"newline\nin string\"} {\"n\":1}"[..],
            "control character byte 0x0a",
        ),
        (
            &b"{\"s\":\"overlong \xc0\xaf\"} {\"n\":1}"[..],
            "invalid UTF-8 byte 0xc0",
        ),
        (
            &b"{'s':'never \xff in UTF-8'} {\"n\":1}"[..],
            "invalid UTF-8 byte 0xff",
        ),
    ] {
        let got = decode(input);
        assert_eq!(
            got,
            vec![
                Err(FrameError::Malformed(format!(
                    "JSON parse error, {what} in string"
                ))),
                Ok(json!({"n": 1})),
            ],
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn top_level_scalars_and_arrays_are_values() {
    let got = ok_values(decode(b"1 \"s\" [1,{\"a\":2}] true null -2.5e1 {}"));
    assert_eq!(
        got,
        vec![
            json!(1),
            json!("s"),
            json!([1, {"a": 2}]),
            json!(true),
            json!(null),
            json!(-25.0),
            json!({})
        ]
    );
}

#[test]
fn top_level_number_ends_at_the_next_object() {
    let got = ok_values(decode(b"42{\"execute\":\"stop\"}"));
    assert_eq!(got, vec![json!(42), json!({"execute": "stop"})]);
}

#[test]
fn too_large_error_text() {
    assert_eq!(
        FrameError::TooLarge { limit: 10 }.to_string(),
        "JSON parse error, object exceeds the size limit of 10 bytes"
    );
}

/// A small deterministic PRNG (xorshift64*), so the property test needs no dependency and
/// every failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_string(rng: &mut Rng) -> String {
    const ALPHABET: &[char] = &[
        'a', 'Z', '0', ' ', '{', '}', '[', ']', ':', ',', '"', '\\', '\n', '\t', 'é', '€', '\u{1}',
    ];
    (0..rng.below(12))
        .map(|_| ALPHABET[rng.below(ALPHABET.len())])
        .collect()
}

fn random_value(rng: &mut Rng, depth: usize) -> Value {
    let kinds = if depth == 0 { 5 } else { 7 };
    match rng.below(kinds) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 1),
        2 => json!(rng.next() as i64 >> rng.below(64)),
        3 => json!((rng.next() % 100_000) as f64 / 64.0 - 700.0),
        4 => Value::String(random_string(rng)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                m.insert(random_string(rng), random_value(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// Random objects, randomly pretty-printed or compact, separated by random whitespace and
/// cut at random places, decode to exactly the objects that were written.
#[test]
fn random_streams_random_splits() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let mut objects = Vec::new();
        let mut stream = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(5) {
                m.insert(random_string(&mut rng), random_value(&mut rng, 4));
            }
            let v = Value::Object(m);
            let text = if rng.below(2) == 0 {
                serde_json::to_vec(&v).unwrap()
            } else {
                serde_json::to_vec_pretty(&v).unwrap()
            };
            stream.extend_from_slice(&text);
            for _ in 0..rng.below(3) {
                stream.push(b" \n\r\t"[rng.below(4)]);
            }
            objects.push(v);
        }
        let mut d = Decoder::new(1 << 20);
        let mut got = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(40));
            got.extend(d.feed(&rest[..n]));
            rest = &rest[n..];
        }
        assert_eq!(ok_values(got), objects, "round {round}");
    }
}

/// Random garbage never panics, never makes the decoder hold more than its limit, and a
/// resynchronising byte followed by a command always gets the command through.
#[test]
fn random_garbage_then_command() {
    let mut rng = Rng(42);
    let limit = 256;
    for round in 0..2000 {
        let mut d = Decoder::new(limit);
        let garbage: Vec<u8> = (0..rng.below(600))
            .map(|_| match rng.below(4) {
                0 => b"{}[]:,\"\\ \n"[rng.below(10)],
                _ => rng.next() as u8,
            })
            .collect();
        let mut out = d.feed(&garbage);
        out.extend(d.feed(b"\xff{\"execute\":\"cont\"}"));
        assert_eq!(
            out.last(),
            Some(&Ok(json!({"execute": "cont"}))),
            "round {round}: garbage {garbage:?}"
        );
    }
}

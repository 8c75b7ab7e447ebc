//! Feeds arbitrary bytes, cut at places chosen by the input itself, through the decoder and
//! the session, and every decoded object through the typed-argument parser. Checks that
//! nothing panics, that every reply is exactly one JSON line with `return` or `error`, and
//! that arguments which parse carry exactly the values sent.
//!
//! Run from `qmp/fuzz` with `cargo +nightly fuzz run decoder_session` (cargo-fuzz).

#![no_main]

use citadel_qmp::arguments::from_arguments;
use citadel_qmp::framing::Decoder;
use citadel_qmp::session::{Outcome, Session};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;

/// An argument type using every feature QMP argument structs use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Args {
    node_name: Option<String>,
    read_only: Option<bool>,
    addr: Option<u8>,
    size: Option<u64>,
    offset: Option<i32>,
    ratio: Option<f64>,
    fds: Option<Vec<u32>>,
    file: Option<File>,
    any: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    driver: Driver,
    filename: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Driver {
    File,
    HostDevice,
}

/// A successful parse carries exactly the values the client sent.
fn check_parsed(args: &Args, members: &serde_json::Map<String, Value>) {
    let sent = |key: &str| members.get(key).filter(|v| !v.is_null());
    assert_eq!(
        args.node_name.as_deref(),
        sent("node-name").and_then(Value::as_str)
    );
    assert_eq!(args.read_only, sent("read-only").and_then(Value::as_bool));
    assert_eq!(
        args.addr.map(u64::from),
        sent("addr").and_then(Value::as_u64)
    );
    assert_eq!(args.size, sent("size").and_then(Value::as_u64));
    assert_eq!(
        args.offset.map(i64::from),
        sent("offset").and_then(Value::as_i64)
    );
    if let Some(ratio) = args.ratio {
        assert_eq!(Some(ratio), sent("ratio").and_then(Value::as_f64));
    }
    if let Some(fds) = &args.fds {
        let sent: Vec<u64> = sent("fds")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        assert_eq!(
            fds.iter().map(|&fd| u64::from(fd)).collect::<Vec<_>>(),
            sent
        );
    }
    if let Some(file) = &args.file {
        let sent = sent("file").expect("file was sent");
        assert_eq!(Some(file.filename.as_str()), sent["filename"].as_str());
        let driver = match file.driver {
            Driver::File => "file",
            Driver::HostDevice => "host-device",
        };
        assert_eq!(Some(driver), sent["driver"].as_str());
    }
    assert_eq!(args.any.as_ref(), sent("any"));
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 32) + 1;
    let mut decoder = Decoder::new(512);
    let mut session = Session::new();
    while !rest.is_empty() {
        let n = chunk.min(rest.len());
        for frame in decoder.feed(&rest[..n]) {
            if let Ok(Value::Object(members)) = &frame {
                if let Ok(args) = from_arguments::<Args>(Some(members.clone())) {
                    check_parsed(&args, members);
                }
            }
            if let Outcome::Reply(line) = session.handle(frame) {
                assert!(line.ends_with("\r\n"));
                assert_eq!(line.matches('\n').count(), 1);
                let v: Value = serde_json::from_str(&line).expect("reply is JSON");
                let obj = v.as_object().expect("reply is an object");
                assert!(obj.contains_key("return") ^ obj.contains_key("error"));
            }
        }
        rest = &rest[n..];
    }
});

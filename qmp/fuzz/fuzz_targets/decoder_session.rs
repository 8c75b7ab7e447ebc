//! Feeds arbitrary bytes, cut at places chosen by the input itself, through the decoder and
//! two sessions (one fresh, one already negotiated, so commands past negotiation are parsed
//! too), every decoded object through the typed-argument parser, and every `arguments`
//! object through the argument parsing of every command Citadel knows. Checks that
//! nothing panics, that every reply is exactly one JSON line with `return` or `error` echoing
//! the request's `id`, that a dispatched request is the command that was named, and that
//! arguments which parse carry exactly the values sent.
//!
//! Run with `scripts/fuzz.sh`, or from `qmp/fuzz` with `cargo fuzz run decoder_session`.

#![no_main]

use citadel_qmp::arguments::from_arguments;
use citadel_qmp::command::{command_names, parse_request, Command};
use citadel_qmp::error::ErrorClass;
use citadel_qmp::framing::Decoder;
use citadel_qmp::reply;
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

/// A reply is one JSON line holding `return` or `error`, and the request's `id` if it had one.
fn check_reply(line: &str, id: Option<&Value>) {
    assert!(line.ends_with("\r\n"));
    assert_eq!(line.matches('\n').count(), 1);
    let v: Value = serde_json::from_str(line).expect("reply is JSON");
    let obj = v.as_object().expect("reply is an object");
    assert!(obj.contains_key("return") ^ obj.contains_key("error"));
    if let Some(id) = id {
        assert_eq!(obj.get("id"), Some(id), "reply echoes the id");
    }
}

/// A frame's `arguments` as the arguments of every known command, and of a name no command
/// has: a command that parses is the one named, a refusal of a known command is an argument
/// error, an unknown name is refused as such whatever the arguments.
fn check_commands(arguments: &serde_json::Map<String, Value>) {
    for &name in command_names() {
        match Command::parse(name, Some(arguments.clone())) {
            Ok(command) => assert_eq!(command.name(), name),
            Err(err) => assert_eq!(err.class, ErrorClass::GenericError, "{name}: {err:?}"),
        }
    }
    let err = Command::parse("x-no-such-command", Some(arguments.clone()))
        .expect_err("unknown commands are refused");
    assert_eq!(err.class, ErrorClass::CommandNotFound);
}

/// Feeds one frame to a session and checks what comes out.
fn run_session(session: &mut Session, frame: Result<Value, citadel_qmp::FrameError>) {
    let sent = frame.as_ref().ok().cloned();
    let id = sent.as_ref().and_then(|v| v.get("id")).cloned();
    match session.handle(frame) {
        Outcome::Reply(line) => check_reply(&line, id.as_ref()),
        Outcome::Dispatch(request) => {
            assert!(session.negotiated());
            let sent = sent.expect("only a decoded value is dispatched");
            assert_eq!(
                Some(request.command.name()),
                sent.get("execute").and_then(Value::as_str)
            );
            assert_eq!(request.id, id);
            assert_eq!(parse_request(sent).as_ref(), Ok(&*request));
            check_reply(
                &reply::success(request.id.as_ref(), Value::Null),
                id.as_ref(),
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 32) + 1;
    let mut decoder = Decoder::new(512);
    let mut fresh = Session::new();
    let mut negotiated = Session::new();
    let greeting = serde_json::json!({"execute": "qmp_capabilities"});
    assert!(matches!(negotiated.handle(Ok(greeting)), Outcome::Reply(_)));
    assert!(negotiated.negotiated());
    while !rest.is_empty() {
        let n = chunk.min(rest.len());
        for frame in decoder.feed(&rest[..n]) {
            if let Ok(Value::Object(members)) = &frame {
                if let Ok(args) = from_arguments::<Args>(Some(members.clone())) {
                    check_parsed(&args, members);
                }
                if let Some(Value::Object(arguments)) = members.get("arguments") {
                    check_commands(arguments);
                }
            }
            run_session(&mut negotiated, frame.clone());
            run_session(&mut fresh, frame);
        }
        rest = &rest[n..];
    }
});

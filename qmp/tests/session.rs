//! Negotiation, request validation, id echo and every error text, as seen on the wire.

use citadel_qmp::command::{command_names, parse_request, Command, Request};
use citadel_qmp::fds::AddFd;
use citadel_qmp::framing::{Decoder, FrameError};
use citadel_qmp::session::{Outcome, Session};
use serde_json::{json, Value};

/// Parses a reply line, checking QEMU's line ending.
fn line(outcome: Outcome) -> Value {
    match outcome {
        Outcome::Reply(text) => {
            assert!(text.ends_with("\r\n"), "{text:?}");
            assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
            serde_json::from_str(&text).expect("reply is JSON")
        }
        Outcome::Dispatch(req) => panic!("expected a reply, got dispatch of {req:?}"),
    }
}

fn dispatch(outcome: Outcome) -> Request {
    match outcome {
        Outcome::Dispatch(req) => *req,
        Outcome::Reply(text) => panic!("expected dispatch, got {text}"),
    }
}

fn negotiated() -> Session {
    let mut s = Session::new();
    let r = line(s.handle(Ok(json!({"execute": "qmp_capabilities"}))));
    assert_eq!(r, json!({"return": {}}));
    s
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn error_id(class: &str, desc: &str, id: Value) -> Value {
    json!({"error": {"class": class, "desc": desc}, "id": id})
}

#[test]
fn negotiation_reply_and_state() {
    let mut s = Session::new();
    assert!(!s.negotiated());
    let r = line(s.handle(Ok(json!({"execute": "qmp_capabilities", "id": "neg"}))));
    assert_eq!(r, json!({"return": {}, "id": "neg"}));
    assert!(s.negotiated());
}

#[test]
fn negotiation_with_empty_enable_list() {
    let mut s = Session::new();
    let r = line(s.handle(Ok(
        json!({"execute": "qmp_capabilities", "arguments": {"enable": []}}),
    )));
    assert_eq!(r, json!({"return": {}}));
    assert!(s.negotiated());
}

#[test]
fn commands_before_negotiation_are_refused() {
    for name in ["query-status", "stop", "quit", "no-such-command"] {
        let mut s = Session::new();
        let r = line(s.handle(Ok(json!({"execute": name, "id": 3}))));
        assert_eq!(
            r,
            error_id(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                json!(3)
            ),
            "{name}"
        );
        assert!(!s.negotiated());
    }
}

#[test]
fn second_negotiation_is_refused() {
    let mut s = negotiated();
    let r = line(s.handle(Ok(json!({"execute": "qmp_capabilities", "id": 9}))));
    assert_eq!(
        r,
        error_id(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
            json!(9)
        )
    );
    assert!(s.negotiated());
}

#[test]
fn unavailable_capabilities_are_refused() {
    let mut s = Session::new();
    let r = line(s.handle(Ok(
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}),
    )));
    assert_eq!(r, error("GenericError", "Capability 'oob' not available"));
    assert!(!s.negotiated());
    let r = line(s.handle(Ok(
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["magic"]}}),
    )));
    assert_eq!(
        r,
        error(
            "GenericError",
            "Parameter 'enable[0]' does not accept value 'magic'"
        )
    );
    assert!(!s.negotiated());
    let r = line(s.handle(Ok(
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob", "x"]}}),
    )));
    assert_eq!(
        r,
        error(
            "GenericError",
            "Parameter 'enable[2]' does not accept value 'x'"
        )
    );
    let r = line(s.handle(Ok(
        json!({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}),
    )));
    assert_eq!(
        r,
        error(
            "GenericError",
            "Invalid parameter type for 'enable', expected: array"
        )
    );
    let r = line(s.handle(Ok(
        json!({"execute": "qmp_capabilities", "arguments": {"enable": [1]}}),
    )));
    assert_eq!(
        r,
        error(
            "GenericError",
            "Invalid parameter type for 'enable[0]', expected: string"
        )
    );
    let r = line(s.handle(Ok(
        json!({"execute": "qmp_capabilities", "arguments": {"bogus": 1}}),
    )));
    assert_eq!(r, error("GenericError", "Parameter 'bogus' is unexpected"));
    assert!(!s.negotiated());
}

#[test]
fn every_command_dispatches_after_negotiation() {
    let expected = [
        ("query-status", Command::QueryStatus),
        ("query-cpus", Command::QueryCpus),
        ("query-hotpluggable-cpus", Command::QueryHotpluggableCpus),
        ("stop", Command::Stop),
        ("cont", Command::Cont),
        ("quit", Command::Quit),
        ("system_reset", Command::SystemReset),
        ("query-version", Command::QueryVersion),
        ("query-commands", Command::QueryCommands),
        ("query-block", Command::QueryBlock),
        ("query-uuid", Command::QueryUuid),
        ("query-fdsets", Command::QueryFdsets),
        ("query-balloon", Command::QueryBalloon),
        ("query-chardev", Command::QueryChardev),
        ("query-migrate", Command::QueryMigrate),
        (
            "add-fd",
            Command::AddFd(AddFd {
                fdset_id: None,
                opaque: None,
            }),
        ),
    ];
    let mut s = negotiated();
    for (name, command) in expected.clone() {
        let req = dispatch(s.handle(Ok(json!({"execute": name}))));
        assert_eq!(
            req,
            Request {
                id: None,
                command: command.clone()
            }
        );
        assert_eq!(command.name(), name);
        let req = dispatch(s.handle(Ok(json!({"execute": name, "arguments": {}}))));
        assert_eq!(req.command, command);
    }
    // Everything that dispatches is listed by query-commands, and nothing else is.
    let mut listed: Vec<&str> = command_names().to_vec();
    let mut known: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    known.push("qmp_capabilities");
    // Those that need arguments (their forms are tested with the device, netdev, fds and
    // chardev modules).
    for name in [
        "blockdev-add",
        "blockdev-del",
        "device_add",
        "device_del",
        "getfd",
        "closefd",
        "remove-fd",
        "netdev_add",
        "netdev_del",
        "balloon",
        "chardev-add",
        "chardev-remove",
        "migrate",
    ] {
        let refused = s.handle(Ok(json!({"execute": name})));
        assert!(
            format!("{refused:?}").contains("is missing"),
            "{name}: {refused:?}"
        );
        known.push(name);
    }
    listed.sort_unstable();
    known.sort_unstable();
    assert_eq!(listed, known);
}

#[test]
fn ids_of_every_json_type_are_echoed_verbatim() {
    let ids = [
        json!(0),
        json!(-17),
        json!(18446744073709551615u64),
        json!(1.5),
        json!("libvirt-42"),
        json!(""),
        json!(true),
        json!(false),
        json!(null),
        json!([1, "two", [3]]),
        json!({"nested": {"id": [null]}}),
    ];
    let mut s = negotiated();
    for id in ids {
        let req = dispatch(s.handle(Ok(json!({"execute": "stop", "id": id.clone()}))));
        assert_eq!(req.id.as_ref(), Some(&id));
        let r = line(s.handle(Ok(json!({"execute": "nope", "id": id.clone()}))));
        assert_eq!(r["id"], id, "error replies echo the id too");
        assert!(r.as_object().unwrap().contains_key("id"));
    }
    // A null id is still an id: it is echoed, not dropped.
    let r = line(s.handle(Ok(json!({"execute": "nope", "id": null}))));
    assert_eq!(r.as_object().unwrap().get("id"), Some(&Value::Null));
}

#[test]
fn envelope_errors() {
    let mut s = negotiated();
    let cases = [
        (json!([1, 2]), None, "QMP input must be a JSON object"),
        (json!("execute"), None, "QMP input must be a JSON object"),
        (json!(5), None, "QMP input must be a JSON object"),
        (json!({}), None, "QMP input lacks member 'execute'"),
        (
            json!({"id": 1}),
            Some(json!(1)),
            "QMP input lacks member 'execute'",
        ),
        (
            json!({"execute": 1, "id": "x"}),
            Some(json!("x")),
            "QMP input member 'execute' must be a string",
        ),
        (
            json!({"execute": null}),
            None,
            "QMP input member 'execute' must be a string",
        ),
        (
            json!({"execute": "stop", "arguments": [], "id": [1]}),
            Some(json!([1])),
            "QMP input member 'arguments' must be an object",
        ),
        (
            json!({"execute": "stop", "foo": 1}),
            None,
            "QMP input member 'foo' is unexpected",
        ),
        (
            json!({"exec-oob": "stop"}),
            None,
            "QMP input member 'exec-oob' is unexpected",
        ),
    ];
    for (input, id, desc) in cases {
        let r = line(s.handle(Ok(input.clone())));
        let want = match id {
            Some(id) => error_id("GenericError", desc, id),
            None => error("GenericError", desc),
        };
        assert_eq!(r, want, "{input}");
    }
}

#[test]
fn envelope_errors_before_negotiation_too() {
    let mut s = Session::new();
    let r = line(s.handle(Ok(json!({"execute": "stop", "foo": 1}))));
    assert_eq!(
        r,
        error("GenericError", "QMP input member 'foo' is unexpected")
    );
}

#[test]
fn unknown_command() {
    let mut s = negotiated();
    let r = line(s.handle(Ok(json!({"execute": "blockdev-snapshot", "id": 2}))));
    assert_eq!(
        r,
        error_id(
            "CommandNotFound",
            "The command blockdev-snapshot has not been found",
            json!(2)
        )
    );
}

#[test]
fn arguments_to_commands_without_parameters() {
    let mut s = negotiated();
    let r = line(s.handle(Ok(
        json!({"execute": "query-status", "arguments": {"verbose": true}, "id": 1}),
    )));
    assert_eq!(
        r,
        error_id(
            "GenericError",
            "Parameter 'verbose' is unexpected",
            json!(1)
        )
    );
}

#[test]
fn frame_errors_become_generic_errors_without_id() {
    let mut s = negotiated();
    let r = line(s.handle(Err(FrameError::TooLarge { limit: 100 })));
    assert_eq!(
        r,
        error(
            "GenericError",
            "JSON parse error, object exceeds the size limit of 100 bytes"
        )
    );
    let r = line(s.handle(Err(FrameError::Malformed(
        "JSON parse error, expecting value, found '}'".into(),
    ))));
    assert_eq!(
        r,
        error(
            "GenericError",
            "JSON parse error, expecting value, found '}'"
        )
    );
}

#[test]
fn parse_request_without_session() {
    let req = parse_request(json!({"execute": "cont", "id": {"k": 1}})).unwrap();
    assert_eq!(
        req,
        Request {
            id: Some(json!({"k": 1})),
            command: Command::Cont
        }
    );
    let req =
        parse_request(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}))
            .unwrap();
    assert_eq!(
        req.command,
        Command::QmpCapabilities {
            enable: vec!["oob".into()]
        }
    );
    let err = parse_request(json!({"execute": "nope", "id": 4})).unwrap_err();
    assert_eq!(err.id, Some(json!(4)));
    assert_eq!(err.error.desc, "The command nope has not been found");
    assert_eq!(err.to_string(), "The command nope has not been found");
}

/// A whole conversation through the decoder and the session, as a server runs it.
#[test]
fn conversation_over_a_byte_stream() {
    let input = concat!(
        "{\"execute\":\"query-status\"}",
        "{\"execute\":\"qmp_capabilities\",\"id\":1}\n",
        "{\"execute\": oops}\n",
        "{\"execute\":\"stop\",\"id\":\"s\"}{\"execute\":\"query-status\",\"id\":2.5}",
    );
    let mut decoder = Decoder::new(1024);
    let mut session = Session::new();
    let mut out = Vec::new();
    for chunk in input.as_bytes().chunks(7) {
        for frame in decoder.feed(chunk) {
            out.push(session.handle(frame));
        }
    }
    assert_eq!(out.len(), 5);
    let mut out = out.into_iter();
    assert_eq!(
        line(out.next().unwrap()),
        error(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    assert_eq!(line(out.next().unwrap()), json!({"return": {}, "id": 1}));
    let r = line(out.next().unwrap());
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(r["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error"));
    assert_eq!(
        dispatch(out.next().unwrap()),
        Request {
            id: Some(json!("s")),
            command: Command::Stop
        }
    );
    assert_eq!(
        dispatch(out.next().unwrap()),
        Request {
            id: Some(json!(2.5)),
            command: Command::QueryStatus
        }
    );
}

/// xorshift64*: deterministic, so a failing round reproduces.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Random mixtures of valid requests, broken requests and noise: every frame gets exactly
/// one outcome, every reply is one JSON line with `return` or `error`, valid commands keep
/// working, and the session never panics.
#[test]
fn random_traffic_always_gets_well_formed_answers() {
    let pieces: &[&[u8]] = &[
        b"{\"execute\":\"qmp_capabilities\"}",
        b"{\"execute\":\"query-status\",\"id\":1}",
        b"{\"execute\":\"stop\",\"arguments\":{\"x\":[1,{}]}}",
        b"{'execute':'cont','id':['a']}",
        b"{\"execute\":7}",
        b"{\"id\":{}}",
        b"[]",
        b"\"str\"",
        b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}",
        b"{\"execute\":",
        b"}",
        b"\xff",
        b"\\u",
        b"{\"a\":\"",
        b" \r\n",
        b"nul",
        b"12",
    ];
    let mut state = 0x1234_5678_9abc_def0u64;
    for round in 0..500 {
        let mut stream = Vec::new();
        for _ in 0..(next(&mut state) % 12) {
            stream.extend_from_slice(pieces[(next(&mut state) % pieces.len() as u64) as usize]);
        }
        // Whatever came before, this always gets through and is answered.
        stream.extend_from_slice(b"\xff{\"execute\":\"qmp_capabilities\",\"id\":\"last\"}");
        let mut decoder = Decoder::new(128);
        let mut session = Session::new();
        let mut last = None;
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = 1 + (next(&mut state) as usize % rest.len().min(16));
            for frame in decoder.feed(&rest[..n]) {
                let outcome = session.handle(frame);
                if let Outcome::Reply(text) = &outcome {
                    assert!(text.ends_with("\r\n") && text.matches('\n').count() == 1);
                    let v: Value = serde_json::from_str(text).expect("reply is JSON");
                    let obj = v.as_object().expect("reply is an object");
                    assert!(
                        obj.contains_key("return") ^ obj.contains_key("error"),
                        "round {round}: {text}"
                    );
                }
                last = Some(outcome);
            }
            rest = &rest[n..];
        }
        let last = line(last.expect("at least the final command is answered"));
        assert_eq!(last["id"], json!("last"), "round {round}: {last}");
        assert!(session.negotiated(), "round {round}");
    }
}

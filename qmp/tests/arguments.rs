//! Typed arguments: QEMU's texts for every kind of mistake, with full member paths.

use citadel_qmp::arguments::from_arguments;
use citadel_qmp::error::{ErrorClass, QmpError};
use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum Driver {
    File,
    HostDevice,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct FileOpts {
    driver: Driver,
    filename: String,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct CacheOpts {
    #[serde(default)]
    direct: bool,
}

/// Shaped like `blockdev-add`'s arguments.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockdevAdd {
    node_name: String,
    file: FileOpts,
    cache: Option<CacheOpts>,
    read_only: Option<bool>,
}

/// Shaped like `device_add`'s arguments.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct DeviceAdd {
    id: String,
    #[serde(alias = "lun")]
    addr: Option<u8>,
    queues: Option<u16>,
    offset: Option<i32>,
    value: Option<u64>,
    ratio: Option<f64>,
    fds: Option<Vec<u32>>,
}

fn args(v: Value) -> Option<Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        _ => panic!("arguments must be an object"),
    }
}

fn err<T: for<'de> Deserialize<'de> + std::fmt::Debug>(v: Value) -> QmpError {
    let e = from_arguments::<T>(args(v)).unwrap_err();
    assert_eq!(e.class, ErrorClass::GenericError);
    e
}

#[test]
fn well_formed_arguments() {
    let got: BlockdevAdd = from_arguments(args(json!({
        "node-name": "drive-0",
        "file": {"driver": "file", "filename": "/path/to/block"},
        "cache": {"direct": true},
        "read-only": false
    })))
    .unwrap();
    assert_eq!(
        got,
        BlockdevAdd {
            node_name: "drive-0".into(),
            file: FileOpts {
                driver: Driver::File,
                filename: "/path/to/block".into()
            },
            cache: Some(CacheOpts { direct: true }),
            read_only: Some(false),
        }
    );
    let got: DeviceAdd = from_arguments(args(json!({
        "id": "d", "lun": 5, "queues": 65535, "offset": -2147483648i64,
        "value": 18446744073709551615u64, "ratio": 2, "fds": [3, 4]
    })))
    .unwrap();
    assert_eq!(got.addr, Some(5), "alias accepted");
    assert_eq!(got.queues, Some(u16::MAX));
    assert_eq!(got.offset, Some(i32::MIN));
    assert_eq!(got.value, Some(u64::MAX));
    assert_eq!(got.ratio, Some(2.0));
    assert_eq!(got.fds, Some(vec![3, 4]));
}

#[test]
fn absent_arguments_mean_an_empty_object() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct AllOptional {
        verbose: Option<bool>,
    }
    let got: AllOptional = from_arguments(None).unwrap();
    assert_eq!(got.verbose, None);
    assert_eq!(
        from_arguments::<DeviceAdd>(None).unwrap_err().desc,
        "Parameter 'id' is missing"
    );
}

#[test]
fn missing_parameters_name_their_path() {
    let e = err::<BlockdevAdd>(json!({"file": {"driver": "file", "filename": "f"}}));
    assert_eq!(e.desc, "Parameter 'node-name' is missing");
    let e = err::<BlockdevAdd>(json!({"node-name": "n", "file": {"driver": "file"}}));
    assert_eq!(e.desc, "Parameter 'file.filename' is missing");
}

#[test]
fn unexpected_parameters_name_their_path() {
    let e = err::<BlockdevAdd>(json!({"node-name": "n", "bogus": 1,
        "file": {"driver": "file", "filename": "f"}}));
    assert_eq!(e.desc, "Parameter 'bogus' is unexpected");
    let e = err::<BlockdevAdd>(json!({"node-name": "n",
        "file": {"driver": "file", "filename": "f"}, "cache": {"direct": true, "no-flush": true}}));
    assert_eq!(e.desc, "Parameter 'cache.no-flush' is unexpected");
}

#[test]
fn wrong_types_name_the_expected_type() {
    let cases = [
        (
            json!({"id": 1}),
            "Invalid parameter type for 'id', expected: string",
        ),
        (
            json!({"id": "d", "addr": "0x1"}),
            "Invalid parameter type for 'addr', expected: integer",
        ),
        (
            json!({"id": "d", "addr": 1.5}),
            "Invalid parameter type for 'addr', expected: integer",
        ),
        (
            json!({"id": "d", "ratio": "fast"}),
            "Invalid parameter type for 'ratio', expected: number",
        ),
        (
            json!({"id": "d", "fds": 3}),
            "Invalid parameter type for 'fds', expected: array",
        ),
        (
            json!({"id": "d", "fds": [3, "x"]}),
            "Invalid parameter type for 'fds[1]', expected: integer",
        ),
    ];
    for (input, desc) in cases {
        assert_eq!(err::<DeviceAdd>(input.clone()).desc, desc, "{input}");
    }
    let e = err::<BlockdevAdd>(json!({"node-name": "n", "file": "f"}));
    assert_eq!(
        e.desc,
        "Invalid parameter type for 'file', expected: object"
    );
    let e = err::<BlockdevAdd>(json!({"node-name": "n",
        "file": {"driver": "file", "filename": "f"}, "read-only": "yes"}));
    assert_eq!(
        e.desc,
        "Invalid parameter type for 'read-only', expected: boolean"
    );
    let e = err::<BlockdevAdd>(json!({"node-name": "n",
        "file": {"driver": 7, "filename": "f"}}));
    assert_eq!(
        e.desc,
        "Invalid parameter type for 'file.driver', expected: string"
    );
}

#[test]
fn out_of_range_integers() {
    let cases = [
        (
            json!({"id": "d", "addr": 256}),
            "Parameter 'addr' expects uint8_t",
        ),
        (
            json!({"id": "d", "addr": -1}),
            "Parameter 'addr' expects uint8_t",
        ),
        (
            json!({"id": "d", "queues": 65536}),
            "Parameter 'queues' expects uint16_t",
        ),
        (
            json!({"id": "d", "offset": 2147483648u64}),
            "Parameter 'offset' expects int32_t",
        ),
        (
            json!({"id": "d", "value": -5}),
            "Parameter 'value' expects uint64_t",
        ),
        (
            json!({"id": "d", "fds": [1, 4294967296u64]}),
            "Parameter 'fds[1]' expects uint32_t",
        ),
    ];
    for (input, desc) in cases {
        assert_eq!(err::<DeviceAdd>(input.clone()).desc, desc, "{input}");
    }
}

#[test]
fn unknown_enumeration_values() {
    let e = err::<BlockdevAdd>(json!({"node-name": "n",
        "file": {"driver": "nbd", "filename": "f"}}));
    assert_eq!(
        e.desc,
        "Parameter 'file.driver' does not accept value 'nbd'"
    );
    let ok: BlockdevAdd = from_arguments(args(json!({"node-name": "n",
        "file": {"driver": "host-device", "filename": "/dev/sdz"}})))
    .unwrap();
    assert_eq!(ok.file.driver, Driver::HostDevice);
}

#[test]
fn top_level_enumeration_list() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Caps {
        enable: Vec<Driver>,
    }
    let e = err::<Caps>(json!({"enable": ["file", "tape"]}));
    assert_eq!(e.desc, "Parameter 'enable[1]' does not accept value 'tape'");
    let ok: Caps = from_arguments(args(json!({"enable": ["host-device"]}))).unwrap();
    assert_eq!(ok.enable, vec![Driver::HostDevice]);
}

#[test]
fn custom_validation_messages_pass_through() {
    #[derive(Debug)]
    struct Even(u32);
    impl<'de> Deserialize<'de> for Even {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let n = u32::deserialize(d)?;
            if n % 2 == 1 {
                return Err(serde::de::Error::custom(format!("{n} is odd")));
            }
            Ok(Even(n))
        }
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Args {
        n: Even,
    }
    assert_eq!(err::<Args>(json!({"n": 3})).desc, "3 is odd");
    let got: Args = from_arguments(args(json!({"n": 4}))).unwrap();
    assert_eq!(got.n.0, 4);
}

#[test]
fn untyped_values_are_kept() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Args {
        anything: Value,
    }
    let got: Args =
        from_arguments(args(json!({"anything": {"a": [1, -2, 2.5, null, true]}}))).unwrap();
    assert_eq!(got.anything, json!({"a": [1, -2, 2.5, null, true]}));
}

//! Exact bytes of replies, events and the greeting.

use std::time::{Duration, UNIX_EPOCH};

use citadel_qmp::error::{ErrorClass, QmpError};
use citadel_qmp::event::{Event, ShutdownReason};
use citadel_qmp::greeting::greeting;
use citadel_qmp::reply::{
    self, command_list, CpuInfo, CpuProps, HotpluggableCpu, RunState, StatusInfo, UuidInfo,
    VersionInfo,
};
use serde_json::json;

#[test]
fn greeting_matches_the_reference() {
    assert_eq!(
        greeting(&VersionInfo::new(4, 0, 1)),
        "{\"QMP\":{\"version\":{\"qemu\":{\"micro\":1,\"minor\":0,\"major\":4},\"package\":\"\"},\"capabilities\":[]}}\r\n"
    );
    assert_eq!(
        greeting(&VersionInfo::new(5, 0, 1).with_package("citadel-0.1.0")),
        "{\"QMP\":{\"version\":{\"qemu\":{\"micro\":1,\"minor\":0,\"major\":5},\"package\":\"citadel-0.1.0\"},\"capabilities\":[]}}\r\n"
    );
}

#[test]
fn success_lines() {
    assert_eq!(reply::success(None, json!({})), "{\"return\":{}}\r\n");
    assert_eq!(
        reply::success(Some(&json!(7)), json!({})),
        "{\"return\":{},\"id\":7}\r\n"
    );
    assert_eq!(
        reply::success(Some(&json!({"b": [1, "x"]})), json!([])),
        "{\"return\":[],\"id\":{\"b\":[1,\"x\"]}}\r\n"
    );
    assert_eq!(
        reply::success(Some(&json!(null)), json!({})),
        "{\"return\":{},\"id\":null}\r\n"
    );
}

#[test]
fn error_lines() {
    let err = QmpError::new(ErrorClass::DeviceNotFound, "Device 'drive-9' not found");
    assert_eq!(
        reply::error(Some(&json!("a")), &err),
        "{\"error\":{\"class\":\"DeviceNotFound\",\"desc\":\"Device 'drive-9' not found\"},\"id\":\"a\"}\r\n"
    );
    let err = QmpError::generic("quote \" and \\ and\nnewline");
    assert_eq!(
        reply::error(None, &err),
        "{\"error\":{\"class\":\"GenericError\",\"desc\":\"quote \\\" and \\\\ and\\nnewline\"}}\r\n"
    );
}

#[test]
fn error_classes_and_constructors() {
    let cases = [
        (
            QmpError::command_not_found("x"),
            "CommandNotFound",
            "The command x has not been found",
        ),
        (
            QmpError::device_not_found("net-0"),
            "DeviceNotFound",
            "Device 'net-0' not found",
        ),
        (
            QmpError::device_not_active("balloon"),
            "DeviceNotActive",
            "No balloon device has been activated",
        ),
        (
            QmpError::kvm_missing_cap("synchronous MMU", "balloon"),
            "KVMMissingCap",
            "Using KVM without synchronous MMU, balloon unavailable",
        ),
        (
            QmpError::missing_parameter("id"),
            "GenericError",
            "Parameter 'id' is missing",
        ),
        (
            QmpError::unexpected_parameter("x"),
            "GenericError",
            "Parameter 'x' is unexpected",
        ),
        (
            QmpError::invalid_parameter_type("value", "integer"),
            "GenericError",
            "Invalid parameter type for 'value', expected: integer",
        ),
        (
            QmpError::invalid_parameter_value("addr", "uint8_t"),
            "GenericError",
            "Parameter 'addr' expects uint8_t",
        ),
        (
            QmpError::unaccepted_value("driver", "floppy"),
            "GenericError",
            "Parameter 'driver' does not accept value 'floppy'",
        ),
    ];
    for (err, class, desc) in cases {
        assert_eq!(err.class.as_str(), class);
        assert_eq!(err.to_string(), desc);
        let line: serde_json::Value = serde_json::from_str(&reply::error(None, &err)).unwrap();
        assert_eq!(line, json!({"error": {"class": class, "desc": desc}}));
    }
}

#[test]
fn query_status_shape() {
    let info = StatusInfo {
        running: true,
        singlestep: false,
        status: RunState::Running,
    };
    assert_eq!(
        reply::success_with(None, &info),
        "{\"return\":{\"running\":true,\"singlestep\":false,\"status\":\"running\"}}\r\n"
    );
}

#[test]
fn run_states_are_spelt_like_qemu() {
    let states = [
        (RunState::Debug, "debug"),
        (RunState::InMigrate, "inmigrate"),
        (RunState::InternalError, "internal-error"),
        (RunState::IoError, "io-error"),
        (RunState::Paused, "paused"),
        (RunState::PostMigrate, "postmigrate"),
        (RunState::Prelaunch, "prelaunch"),
        (RunState::FinishMigrate, "finish-migrate"),
        (RunState::RestoreVm, "restore-vm"),
        (RunState::Running, "running"),
        (RunState::SaveVm, "save-vm"),
        (RunState::Shutdown, "shutdown"),
        (RunState::Suspended, "suspended"),
        (RunState::Watchdog, "watchdog"),
        (RunState::GuestPanicked, "guest-panicked"),
        (RunState::Colo, "colo"),
    ];
    for (state, text) in states {
        assert_eq!(serde_json::to_value(state).unwrap(), json!(text));
    }
}

fn props(n: u32) -> CpuProps {
    CpuProps {
        core_id: n,
        socket_id: 0,
        thread_id: 0,
    }
}

#[test]
fn query_cpus_shape() {
    let cpus = vec![
        CpuInfo {
            cpu: 0,
            arch: "x86".into(),
            current: true,
            halted: false,
            props: props(0),
            qom_path: "/machine/unattached/device[0]".into(),
            thread_id: 8439,
        },
        CpuInfo {
            cpu: 1,
            arch: "x86".into(),
            current: false,
            halted: true,
            props: props(1),
            qom_path: "/machine/unattached/device[1]".into(),
            thread_id: 8440,
        },
    ];
    assert_eq!(
        reply::success_with(Some(&json!(1)), &cpus),
        concat!(
            "{\"return\":[",
            "{\"CPU\":0,\"arch\":\"x86\",\"current\":true,\"halted\":false,",
            "\"props\":{\"core-id\":0,\"socket-id\":0,\"thread-id\":0},",
            "\"qom_path\":\"/machine/unattached/device[0]\",\"thread_id\":8439},",
            "{\"CPU\":1,\"arch\":\"x86\",\"current\":false,\"halted\":true,",
            "\"props\":{\"core-id\":1,\"socket-id\":0,\"thread-id\":0},",
            "\"qom_path\":\"/machine/unattached/device[1]\",\"thread_id\":8440}",
            "],\"id\":1}\r\n"
        )
    );
}

#[test]
fn query_hotpluggable_cpus_shape() {
    let cpus = vec![HotpluggableCpu {
        props: props(0),
        qom_path: "/machine/unattached/device[0]".into(),
        cpu_type: "host-x86-cpu".into(),
        vcpus_count: 1,
    }];
    assert_eq!(
        reply::success_with(None, &cpus),
        concat!(
            "{\"return\":[{\"props\":{\"core-id\":0,\"socket-id\":0,\"thread-id\":0},",
            "\"qom-path\":\"/machine/unattached/device[0]\",\"type\":\"host-x86-cpu\",",
            "\"vcpus-count\":1}]}\r\n"
        )
    );
}

#[test]
fn query_uuid_shape() {
    assert_eq!(
        reply::success_with(
            None,
            &UuidInfo {
                uuid: UuidInfo::NONE.to_string()
            }
        ),
        "{\"return\":{\"UUID\":\"00000000-0000-0000-0000-000000000000\"}}\r\n"
    );
}

#[test]
fn query_version_shape() {
    assert_eq!(
        reply::success_with(None, &VersionInfo::new(0, 1, 2)),
        "{\"return\":{\"qemu\":{\"micro\":2,\"minor\":1,\"major\":0},\"package\":\"\"}}\r\n"
    );
}

#[test]
fn query_commands_shape() {
    let line = reply::success_with(None, &command_list());
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let names: Vec<&str> = v["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c.as_object().unwrap().len(), 1, "only a name: {c}");
            c["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(names, citadel_qmp::command::command_names());
    assert!(names.contains(&"query-status"));
}

#[test]
fn typed_and_untyped_success_agree() {
    let info = StatusInfo {
        running: false,
        singlestep: false,
        status: RunState::Paused,
    };
    assert_eq!(
        reply::success(Some(&json!(3)), serde_json::to_value(&info).unwrap()),
        reply::success_with(Some(&json!(3)), &info)
    );
}

#[test]
fn events_with_timestamps() {
    let at = UNIX_EPOCH + Duration::new(1_583_908_726, 162_739_999);
    assert_eq!(
        Event::stop().to_line(at),
        "{\"event\":\"STOP\",\"timestamp\":{\"seconds\":1583908726,\"microseconds\":162739}}\r\n"
    );
    assert_eq!(
        Event::resume().to_line(at),
        "{\"event\":\"RESUME\",\"timestamp\":{\"seconds\":1583908726,\"microseconds\":162739}}\r\n"
    );
    assert_eq!(
        Event::shutdown(false, ShutdownReason::HostQmpQuit).to_line(at),
        "{\"event\":\"SHUTDOWN\",\"data\":{\"guest\":false,\"reason\":\"host-qmp-quit\"},\"timestamp\":{\"seconds\":1583908726,\"microseconds\":162739}}\r\n"
    );
    assert_eq!(
        Event::device_deleted("net-0", "net-0").to_line(UNIX_EPOCH),
        "{\"event\":\"DEVICE_DELETED\",\"data\":{\"device\":\"net-0\",\"path\":\"net-0\"},\"timestamp\":{\"seconds\":0,\"microseconds\":0}}\r\n"
    );
}

#[test]
fn event_data_and_reasons() {
    let reasons = [
        (ShutdownReason::None, "none"),
        (ShutdownReason::HostError, "host-error"),
        (ShutdownReason::HostQmpQuit, "host-qmp-quit"),
        (ShutdownReason::HostQmpSystemReset, "host-qmp-system-reset"),
        (ShutdownReason::HostSignal, "host-signal"),
        (ShutdownReason::HostUi, "host-ui"),
        (ShutdownReason::GuestShutdown, "guest-shutdown"),
        (ShutdownReason::GuestReset, "guest-reset"),
        (ShutdownReason::GuestPanic, "guest-panic"),
        (ShutdownReason::SubsystemReset, "subsystem-reset"),
        (ShutdownReason::SnapshotLoad, "snapshot-load"),
    ];
    for (reason, text) in reasons {
        assert_eq!(
            Event::shutdown(true, reason).data,
            Some(json!({"guest": true, "reason": text}))
        );
        let reset = Event::reset(false, reason);
        assert_eq!(reset.name, "RESET");
        assert_eq!(reset.data, Some(json!({"guest": false, "reason": text})));
    }
    let e = Event::balloon_change(1 << 30);
    assert_eq!(e.name, "BALLOON_CHANGE");
    assert_eq!(e.data, Some(json!({"actual": 1073741824u64})));
    let e = Event::new("CUSTOM", Some(json!({"k": [1]})));
    assert_eq!(
        e.to_line(UNIX_EPOCH + Duration::from_micros(1_000_001)),
        "{\"event\":\"CUSTOM\",\"data\":{\"k\":[1]},\"timestamp\":{\"seconds\":1,\"microseconds\":1}}\r\n"
    );
}

#[test]
fn event_before_the_epoch_is_stamped_zero() {
    let line = Event::stop().to_line(UNIX_EPOCH - Duration::from_secs(5));
    assert!(line.contains("\"timestamp\":{\"seconds\":0,\"microseconds\":0}"));
}

//! `citadel-qmp`: a small, static QMP client for scripts and for places without `ncat -U` or
//! Python (the nested-KVM lab's busybox has neither a Unix-socket `nc` nor an interpreter).
//!
//! ```text
//! citadel-qmp [--timeout SECS] [--tag NAME] SOCKET [STEP...]
//! ```
//!
//! It connects (retrying until the socket exists), prints the greeting, negotiates
//! capabilities, then runs the steps in order:
//!
//! - a JSON object: sent as is; the client waits for its reply (`return` or `error`);
//! - `wait-event:NAME`: waits for the event NAME (an event seen earlier in this run counts once);
//! - `sleep:MS`: pauses.
//!
//! Without steps it relays standard input to the socket line by line and prints everything the
//! server sends until either side closes. Every line sent is printed as `[TAG >] ...` and every
//! line received as `[TAG <] ...`, so a transcript shows each exchange in order. The exit status
//! is 0 when every step succeeded, 3 when a command got an error reply (the remaining steps
//! still run), and 1 on a connection failure, a malformed server stream or a timeout.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use citadel_qmp::Decoder;
use serde_json::Value;

/// Largest object accepted from the server.
const MAX_OBJECT_BYTES: usize = 1 << 20;
/// How long a connection attempt keeps retrying while the socket does not exist yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("usage: citadel-qmp [--timeout SECS] [--tag NAME] SOCKET [STEP...] ({0})")]
    Usage(String),
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("the server closed the connection {0}")]
    Closed(&'static str),
    #[error("malformed QMP stream from the server: {0}")]
    Stream(String),
    #[error("timed out after {0:?} {1}")]
    Timeout(Duration, String),
}

enum Step {
    Command(Value),
    WaitEvent(String),
    Sleep(Duration),
}

struct Options {
    timeout: Duration,
    tag: String,
    socket: PathBuf,
    steps: Vec<Step>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, ClientError> {
    let mut timeout = Duration::from_secs(30);
    let mut tag = "qmp".to_string();
    let mut socket = None;
    let mut steps = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--timeout" => {
                let secs = args
                    .next()
                    .and_then(|s| s.parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e6)
                    .ok_or_else(|| ClientError::Usage("--timeout takes seconds".into()))?;
                timeout = Duration::from_secs_f64(secs);
            }
            "--tag" => {
                tag = args
                    .next()
                    .ok_or_else(|| ClientError::Usage("--tag takes a name".into()))?;
            }
            _ if socket.is_none() => socket = Some(PathBuf::from(arg)),
            _ => steps.push(parse_step(&arg)?),
        }
    }
    let socket = socket.ok_or_else(|| ClientError::Usage("no socket given".into()))?;
    Ok(Options {
        timeout,
        tag,
        socket,
        steps,
    })
}

fn parse_step(arg: &str) -> Result<Step, ClientError> {
    if let Some(name) = arg.strip_prefix("wait-event:") {
        return Ok(Step::WaitEvent(name.to_string()));
    }
    if let Some(ms) = arg.strip_prefix("sleep:") {
        let ms = ms
            .parse::<u64>()
            .map_err(|_| ClientError::Usage(format!("bad sleep step '{arg}'")))?;
        return Ok(Step::Sleep(Duration::from_millis(ms)));
    }
    match serde_json::from_str::<Value>(arg) {
        Ok(value @ Value::Object(_)) => Ok(Step::Command(value)),
        _ => Err(ClientError::Usage(format!(
            "step '{arg}' is neither a JSON object, wait-event:NAME nor sleep:MS"
        ))),
    }
}

/// One connection: decoded objects not yet consumed by a step, and the events seen.
struct Connection {
    stream: UnixStream,
    decoder: Decoder,
    tag: String,
    pending: VecDeque<Value>,
    events: Vec<String>,
}

impl Connection {
    fn open(path: &PathBuf, tag: String, deadline: Instant) -> Result<Self, ClientError> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(CONNECT_RETRY)
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        path: path.clone(),
                        source,
                    })
                }
            }
        };
        Ok(Connection {
            stream,
            decoder: Decoder::new(MAX_OBJECT_BYTES),
            tag,
            pending: VecDeque::new(),
            events: Vec::new(),
        })
    }

    fn send(&mut self, value: &Value) -> Result<(), ClientError> {
        let line = value.to_string();
        println!("[{} >] {line}", self.tag);
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|source| ClientError::Io {
                what: "writing to the QMP socket",
                source,
            })
    }

    /// The next object from the server that is not an event, read with the time left until
    /// `deadline`.
    fn next(&mut self, deadline: Instant, waiting_for: &str) -> Result<Value, ClientError> {
        loop {
            if let Some(value) = self.pending.pop_front() {
                return Ok(value);
            }
            self.read_more(deadline, waiting_for)?;
        }
    }

    /// Reads what the server sent next, with the time left until `deadline`: events go to
    /// `events`, everything else to `pending`.
    fn read_more(&mut self, deadline: Instant, waiting_for: &str) -> Result<(), ClientError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(
                    left,
                    format!("waiting for {waiting_for}"),
                ));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| ClientError::Io {
                    what: "setting the read timeout",
                    source,
                })?;
            let mut buf = [0u8; 65536];
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed("while a step was waiting")),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(source) => {
                    return Err(ClientError::Io {
                        what: "reading the QMP socket",
                        source,
                    })
                }
            };
            for frame in self.decoder.feed(&buf[..n]) {
                let value = frame.map_err(|e| ClientError::Stream(e.to_string()))?;
                println!("[{} <] {value}", self.tag);
                if let Some(name) = value.get("event").and_then(Value::as_str) {
                    self.events.push(name.to_string());
                } else {
                    self.pending.push_back(value);
                }
            }
            return Ok(());
        }
    }

    /// Sends a command and waits for its reply; true when it succeeded.
    fn execute(&mut self, command: &Value, deadline: Instant) -> Result<bool, ClientError> {
        self.send(command)?;
        let what = command
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or("the reply")
            .to_string();
        loop {
            let reply = self.next(deadline, &format!("the reply to {what}"))?;
            if reply.get("return").is_some() {
                return Ok(true);
            }
            if reply.get("error").is_some() {
                return Ok(false);
            }
        }
    }

    fn wait_event(&mut self, name: &str, deadline: Instant) -> Result<(), ClientError> {
        loop {
            if let Some(at) = self.events.iter().position(|e| e == name) {
                self.events.remove(at);
                return Ok(());
            }
            self.read_more(deadline, &format!("event {name}"))?;
            // Only events are expected here; a stray reply is kept for no one and dropped.
            self.pending.clear();
        }
    }
}

fn run(options: Options) -> Result<bool, ClientError> {
    let deadline = Instant::now() + options.timeout;
    let mut conn = Connection::open(&options.socket, options.tag.clone(), deadline)?;
    let greeting = conn.next(deadline, "the greeting")?;
    if greeting.get("QMP").is_none() {
        return Err(ClientError::Stream(format!(
            "not a QMP greeting: {greeting}"
        )));
    }
    if !conn.execute(
        &serde_json::json!({"execute": "qmp_capabilities"}),
        deadline,
    )? {
        return Ok(false);
    }
    if options.steps.is_empty() {
        return relay(conn);
    }
    let mut all_ok = true;
    for step in options.steps {
        let deadline = Instant::now() + options.timeout;
        match step {
            Step::Command(command) => all_ok &= conn.execute(&command, deadline)?,
            Step::WaitEvent(name) => conn.wait_event(&name, deadline)?,
            Step::Sleep(pause) => std::thread::sleep(pause),
        }
    }
    Ok(all_ok)
}

/// Interactive mode: standard input to the socket, the socket to standard output.
fn relay(mut conn: Connection) -> Result<bool, ClientError> {
    let mut writer = conn.stream.try_clone().map_err(|source| ClientError::Io {
        what: "duplicating the QMP socket",
        source,
    })?;
    let tag = conn.tag.clone();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            println!("[{tag} >] {line}");
            if writer.write_all(format!("{line}\n").as_bytes()).is_err() {
                break;
            }
        }
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    loop {
        match conn.next(far, "the server") {
            Ok(_) => {}
            Err(ClientError::Closed(_)) => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("citadel-qmp: {e}");
            return ExitCode::from(1);
        }
    };
    let tag = options.tag.clone();
    let result = run(options);
    let _ = io::stdout().flush();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            eprintln!("citadel-qmp [{tag}]: {e}");
            ExitCode::from(1)
        }
    }
}

//! citadel-vu-bench: a host-side vhost-user-blk frontend that benchmarks any backend with no
//! guest. It maps a memfd as guest memory, plays the virtio driver on split virtqueues, and
//! reports IOPS, MB/s and the backend's CPU time per I/O.

mod cli;
mod cpu;
mod device;
mod histogram;
mod job;
mod memory;
mod ring;

use std::io::Write;
use std::process::ExitCode;

use cli::{Command, Options};
use job::JobReport;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let options = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("citadel-vu-bench: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    match job::run(&options) {
        Ok(report) => {
            let summary = Summary::new(&options, &report);
            // A reader that went away (a closed pipe) is not worth a panic: the figures
            // simply have nowhere to go.
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{}\n{}", summary.human(), summary.json()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::warn!("writing the results: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("citadel-vu-bench: {}: {e}", options.socket.display());
            ExitCode::FAILURE
        }
    }
}

/// Latency percentiles reported, as fractions.
const PERCENTILES: [f64; 3] = [0.5, 0.99, 0.999];

/// Figures derived from a job's report.
struct Summary<'a> {
    options: &'a Options,
    report: &'a JobReport,
    seconds: f64,
    iops: f64,
    mb_per_s: f64,
    latency_us: f64,
    percentiles_us: [Option<f64>; 3],
    backend_us_per_io: Option<f64>,
    backend_cpu_percent: Option<f64>,
    bench_us_per_io: f64,
}

impl<'a> Summary<'a> {
    fn new(options: &'a Options, report: &'a JobReport) -> Self {
        let seconds = report.elapsed.as_secs_f64();
        let per_second = |x: f64| if seconds > 0.0 { x / seconds } else { 0.0 };
        let ios = report.ios.max(1) as f64;
        Self {
            options,
            report,
            seconds,
            iops: per_second(report.ios as f64),
            mb_per_s: per_second(report.bytes as f64) / 1e6,
            latency_us: report.latency_sum.as_secs_f64() * 1e6 / ios,
            percentiles_us: PERCENTILES
                .map(|q| report.latency.quantile(q).map(|d| d.as_secs_f64() * 1e6)),
            backend_us_per_io: report.backend_cpu.map(|c| c.as_secs_f64() * 1e6 / ios),
            backend_cpu_percent: report
                .backend_cpu
                .map(|c| per_second(c.as_secs_f64()) * 100.0),
            bench_us_per_io: report.bench_cpu.as_secs_f64() * 1e6 / ios,
        }
    }

    fn human(&self) -> String {
        let o = self.options;
        let backend = match (self.backend_us_per_io, self.backend_cpu_percent) {
            (Some(us), Some(pct)) => format!("backend {us:.2} µs CPU/IO ({pct:.0}% CPU)"),
            _ => "backend CPU not measured (no --backend-pid)".to_string(),
        };
        format!(
            "{}: {} bs={} iodepth={} queues={}{}: {:.0} IOPS, {:.1} MB/s, latency µs mean {:.1} p50 {} p99 {} p99.9 {}, {}, bench {:.2} µs CPU/IO, {} I/Os in {:.2} s",
            o.label,
            o.pattern.name(),
            o.block_size,
            o.iodepth,
            o.queues,
            if o.event_idx { " event_idx" } else { "" },
            self.iops,
            self.mb_per_s,
            self.latency_us,
            fmt_us(self.percentiles_us[0]),
            fmt_us(self.percentiles_us[1]),
            fmt_us(self.percentiles_us[2]),
            backend,
            self.bench_us_per_io,
            self.report.ios,
            self.seconds,
        )
    }

    fn json(&self) -> String {
        let o = self.options;
        serde_json::json!({
            "label": o.label,
            "socket": o.socket.display().to_string(),
            "pattern": o.pattern.name(),
            "bs": o.block_size,
            "iodepth": o.iodepth,
            "queues": o.queues,
            "queue_size": o.queue_size,
            "event_idx": o.event_idx,
            "capacity": self.report.capacity,
            "features": format!("{:#x}", self.report.features),
            "ios": self.report.ios,
            "bytes": self.report.bytes,
            "seconds": self.seconds,
            "iops": self.iops,
            "mb_per_s": self.mb_per_s,
            "lat_mean_us": self.latency_us,
            "lat_p50_us": self.percentiles_us[0],
            "lat_p99_us": self.percentiles_us[1],
            "lat_p999_us": self.percentiles_us[2],
            "backend_pid": o.backend_pid,
            "backend_cpu_us_per_io": self.backend_us_per_io,
            "backend_cpu_percent": self.backend_cpu_percent,
            "bench_cpu_us_per_io": self.bench_us_per_io,
        })
        .to_string()
    }
}

fn fmt_us(us: Option<f64>) -> String {
    us.map_or_else(|| "-".to_string(), |us| format!("{us:.1}"))
}

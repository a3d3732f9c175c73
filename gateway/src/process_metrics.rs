//! The process's own resources as metrics, read when `/metrics` is scraped: the tokio tasks
//! alive, open file descriptors and resident memory. A leak of any of them shows as a series
//! that only grows under steady load (the soak benchmark and the upstream fault tests read
//! them).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, Opts};

/// Registers the collector into `registry`; `runtime` is the runtime that serves requests.
pub(crate) fn register(
    registry: &prometheus::Registry,
    runtime: tokio::runtime::Handle,
) -> Result<(), prometheus::Error> {
    let gauge = |name: &str, help: &str| IntGauge::with_opts(Opts::new(name, help));
    let collector = ProcessCollector {
        runtime,
        tasks: gauge(
            "gateway_runtime_alive_tasks",
            "Tokio tasks alive in the serving runtime (connections, requests in flight, timers of the gateway's own work).",
        )?,
        fds: gauge(
            "gateway_process_open_fds",
            "File descriptors the process holds open (sockets, files).",
        )?,
        rss: gauge(
            "gateway_process_resident_bytes",
            "Resident memory of the process, in bytes.",
        )?,
    };
    registry.register(Box::new(collector))
}

struct ProcessCollector {
    runtime: tokio::runtime::Handle,
    tasks: IntGauge,
    fds: IntGauge,
    rss: IntGauge,
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        [&self.tasks, &self.fds, &self.rss]
            .into_iter()
            .flat_map(|g| g.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.tasks
            .set(self.runtime.metrics().num_alive_tasks() as i64);
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle read_dir holds is one of them.
            self.fds.set(dir.count() as i64 - 1);
        }
        if let Some(kib) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<i64>()
                    .ok()
            })
        {
            self.rss.set(kib * 1024);
        }
        [&self.tasks, &self.fds, &self.rss]
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

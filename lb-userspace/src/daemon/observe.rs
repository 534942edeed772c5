//! What `lb run` sets up to be watched: the access log and the health-check log (background
//! writers, reopened on SIGHUP), and the metrics hub with a source per plane.
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;

use crate::accesslog::health::ProbeRecord;
use crate::accesslog::writer::QUEUE_CAPACITY;
use crate::accesslog::{Destination, LogWriter, Rotation, access_log_writer, elb_id};
use crate::cli::RunArgs;
use crate::dataplane::Maps;
use crate::metrics::history::Hub;
use crate::metrics::{Metric, Series, l4, l7};
use crate::proxy::server::{AccessLog, L7Handle};
use crate::registry::ControlPlane;

/// The health-check log.
pub type HealthLog = LogWriter<ProbeRecord>;

/// The logs `lb run` writes besides its own.
#[derive(Default)]
pub struct Logs {
    /// One line per L7 request.
    pub access: Option<Arc<AccessLog>>,
    /// One line per health-check probe.
    pub health: Option<Arc<HealthLog>>,
}

fn destination(path: &Path) -> Destination {
    if path.as_os_str() == "-" {
        Destination::Stdout
    } else {
        Destination::File(path.to_owned())
    }
}

impl Logs {
    /// Opens the logs the flags ask for (a path that cannot be opened is an error now).
    pub fn open(args: &RunArgs) -> anyhow::Result<Self> {
        let elb = elb_id(&args.lb_name);
        let rotation = Rotation {
            max_bytes: args.access_log_max_size,
            interval: args.access_log_rotate_interval.map(Duration::from_secs),
            keep: args.access_log_keep,
        };
        let access = match &args.access_log {
            None => None,
            Some(path) => {
                let w = access_log_writer(destination(path), rotation, QUEUE_CAPACITY, elb.clone())
                    .with_context(|| format!("--access-log {}", path.display()))?;
                Some(Arc::new(w))
            }
        };
        let health = match &args.health_check_log {
            None => None,
            Some(path) => {
                let w = LogWriter::start(
                    "hc-log",
                    destination(path),
                    rotation,
                    move |r: &ProbeRecord, out: &mut String| r.write_line(&elb, out),
                )
                .with_context(|| format!("--health-check-log {}", path.display()))?;
                Some(Arc::new(w))
            }
        };
        Ok(Self { access, health })
    }

    /// Reopens the log files at their paths (SIGHUP, after logrotate moved them).
    pub fn reopen(&self) {
        if let Some(a) = &self.access {
            a.reopen();
        }
        if let Some(h) = &self.health {
            h.reopen();
        }
    }

    /// Reopens the logs on every SIGHUP until the task is dropped.
    pub async fn reopen_on_sighup(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("no SIGHUP handler: the logs cannot be reopened");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reopening the logs");
            self.reopen();
        }
    }

    /// Writes what is queued (waiting at most `wait` for each log).
    pub fn close(&self, wait: Duration) {
        if let Some(a) = &self.access {
            a.close(wait);
        }
        if let Some(h) = &self.health {
            h.close(wait);
        }
    }

    fn collect(&self, out: &mut Vec<Series>) {
        let mut push = |name: &str, written: u64, dropped: u64| {
            out.push(Series::count(
                Metric::LogLinesWritten,
                vec![name.to_owned()],
                written,
            ));
            out.push(Series::count(
                Metric::LogLinesDropped,
                vec![name.to_owned()],
                dropped,
            ));
        };
        if let Some(a) = &self.access {
            let s = a.stats();
            push("access", s.written, s.dropped);
        }
        if let Some(h) = &self.health {
            let s = h.stats();
            push("health_check", s.written, s.dropped);
        }
    }
}

/// The metrics hub of a daemon: the L7 tier's cells and pool, the registry's host counts, the
/// L4 maps (opened again from their pins, so reading them never waits on the ring writer),
/// the logs. Takes its baseline sample now.
pub fn hub(
    l7: Option<L7Handle>,
    plane: Arc<ControlPlane>,
    l4_pins: Option<&Path>,
    logs: Arc<Logs>,
) -> anyhow::Result<Arc<Hub>> {
    let mut hub = Hub::new();
    if let Some(handle) = l7 {
        hub.add_source(Box::new(move |out| l7::collect(&handle, out)));
    }
    hub.add_source(Box::new(move |out| {
        l7::collect_hosts(&plane.current(), out);
    }));
    if let Some(pins) = l4_pins {
        let maps = Mutex::new(
            Maps::open_pinned(pins)
                .with_context(|| format!("opening the pinned maps at {}", pins.display()))?,
        );
        hub.add_source(Box::new(move |out| {
            let maps = maps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = l4::collect(&maps, out) {
                tracing::debug!(error = %e, "reading the L4 maps for metrics");
            }
        }));
    }
    hub.add_source(Box::new(move |out| logs.collect(out)));
    let hub = Arc::new(hub);
    hub.sample();
    Ok(hub)
}

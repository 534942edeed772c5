//! `lb stats`: both planes of a running `lb run`, from another process.
//!
//! L4 comes from the pinned maps (read here, so the numbers are the kernel's own, also when
//! the daemon is busy); L7, health and the history behind the 1- and 5-minute columns come
//! through the admin API (`DescribeMetrics`). Either source alone is enough: what the other
//! would add is left out with a note on stderr.
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};

use crate::admin::{Endpoint, Request, call};
use crate::cli::{PinArgs, StatsArgs};
use crate::dataplane::Maps;
use crate::metrics::history::{HistogramStats, Report, SeriesReport};
use crate::metrics::{DESCRIPTORS, l4};

/// `lb stats`.
pub fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let Some(every) = args.watch else {
        return once(args);
    };
    let every = Duration::try_from_secs_f64(every)
        .ok()
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(2));
    let clear = !args.json && std::io::stdout().is_terminal();
    loop {
        if clear {
            // Home and clear: refresh in place.
            print!("\x1b[H\x1b[2J");
        }
        if let Err(e) = once(args) {
            eprintln!("lb stats: {e:#}");
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(every);
    }
}

fn endpoint(args: &StatsArgs) -> Endpoint {
    match args.admin_url {
        Some(addr) => Endpoint::Tcp {
            addr,
            token: args.admin_token.clone(),
        },
        None => Endpoint::Unix(args.admin_socket.clone()),
    }
}

type Key = (String, BTreeMap<String, String>);

fn key(s: &SeriesReport) -> Key {
    (s.prometheus.clone(), s.dimensions.clone())
}

/// One snapshot: the L4 document of the pins (`vips`, `reasons`, `health_check_probes`) and
/// every metric series, L4 totals taken from the pins.
fn gather(args: &StatsArgs) -> anyhow::Result<(Option<Value>, Report)> {
    let maps = Maps::open_pinned(&args.pin_path);
    let admin = call(&endpoint(args), &Request::DescribeMetrics);
    let (maps, report) = match (maps, admin) {
        (Err(m), Err(a)) => bail!(
            "no L4 maps at {} ({m}) and no admin API ({a})",
            args.pin_path.display()
        ),
        (maps, admin) => {
            let report = match admin {
                Ok(r) => r.metrics.unwrap_or_default(),
                Err(e) => {
                    eprintln!("lb stats: no admin API ({e}): L4 totals only, no L7, no windows");
                    Report::default()
                }
            };
            let daemon_has_l4 = report
                .series
                .iter()
                .any(|s| s.dimensions.contains_key("vip"));
            if let Err(e) = &maps
                && daemon_has_l4
            {
                eprintln!(
                    "lb stats: no L4 maps at {} ({e}): L4 as the daemon saw it",
                    args.pin_path.display()
                );
            }
            (maps.ok(), report)
        }
    };
    let mut report = report;
    let mut doc = None;
    if let Some(maps) = &maps {
        doc = Some(crate::inspect::stats_json(maps)?);
        let mut pins = Vec::new();
        l4::collect(maps, &mut pins)?;
        let index: HashMap<Key, usize> = report
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| (key(s), i))
            .collect();
        for s in pins {
            let fresh = SeriesReport::plain(&s);
            match index.get(&key(&fresh)) {
                Some(&i) => {
                    let old = &mut report.series[i];
                    if fresh.total.is_some() {
                        old.total = fresh.total;
                    }
                    if fresh.value.is_some() {
                        old.value = fresh.value;
                    }
                }
                None => report.series.push(fresh),
            }
        }
    }
    Ok((doc, report))
}

fn once(args: &StatsArgs) -> anyhow::Result<()> {
    let (doc, report) = gather(args)?;
    if args.json {
        let mut out = match doc {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        out.insert("time".into(), json!(report.time));
        out.insert("uptime_seconds".into(), json!(report.uptime_seconds));
        out.insert("metrics".into(), serde_json::to_value(&report.series)?);
        if args.watch.is_some() {
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        return Ok(());
    }
    if doc.is_some() {
        crate::inspect::stats(&PinArgs {
            pin_path: args.pin_path.clone(),
            json: false,
        })?;
        println!();
    }
    print_table(&report);
    Ok(())
}

fn dims(s: &SeriesReport) -> String {
    let d: Vec<String> = s
        .dimensions
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if d.is_empty() {
        "-".into()
    } else {
        d.join(" ")
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

fn hist(h: Option<&HistogramStats>) -> String {
    match h {
        Some(h) if h.count > 0 => format!(
            "n={} avg={} p50={} p90={} p99={}",
            h.count,
            secs(h.average),
            secs(h.p50),
            secs(h.p90),
            secs(h.p99)
        ),
        _ => "n=0".into(),
    }
}

fn print_table(report: &Report) {
    if report.series.is_empty() {
        return;
    }
    let order: HashMap<&str, usize> = DESCRIPTORS
        .iter()
        .enumerate()
        .map(|(i, d)| (d.prometheus, i))
        .collect();
    let mut series: Vec<&SeriesReport> = report.series.iter().collect();
    series.sort_by(|a, b| {
        order
            .get(a.prometheus.as_str())
            .cmp(&order.get(b.prometheus.as_str()))
            .then_with(|| a.dimensions.cmp(&b.dimensions))
    });
    println!(
        "metrics over the daemon's last 1 and 5 minutes (up {:.0} s; counters at zero left out, --json has all)",
        report.uptime_seconds
    );
    println!(
        "{:<48} {:<40} {:>12} {:>10} {:>10} {:>10}",
        "METRIC", "DIMENSIONS", "TOTAL", "1 MIN", "5 MIN", "PER SEC"
    );
    for s in series {
        let name = &s.metric;
        if let Some(total) = s.total {
            if total == 0 && s.sum_5m.unwrap_or(0) == 0 {
                continue;
            }
            let w = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
            println!(
                "{:<48} {:<40} {:>12} {:>10} {:>10} {:>10}",
                name,
                dims(s),
                total,
                w(s.sum_1m),
                w(s.sum_5m),
                s.per_second
                    .map_or_else(|| "-".into(), |v| format!("{v:.2}"))
            );
        } else if let Some(v) = s.value {
            println!(
                "{:<48} {:<40} {:>12}",
                name,
                dims(s),
                format!("{v:.3}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
            );
        } else if s.all.is_some() {
            if s.all.as_ref().is_none_or(|h| h.count == 0) {
                continue;
            }
            println!("{:<48} {:<40}", name, dims(s));
            println!("    all:    {}", hist(s.all.as_ref()));
            println!("    1 min:  {}", hist(s.last_1m.as_ref()));
            println!("    5 min:  {}", hist(s.last_5m.as_ref()));
        }
    }
}

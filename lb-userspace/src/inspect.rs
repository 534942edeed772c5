//! `lb stats` and `lb dump …`: read the pinned maps of a running `lb run` from another process
//! and print them as a table (or JSON with `--json`).

use std::{collections::HashMap, net::SocketAddr};

use anyhow::Context as _;
use lb_common::{BACKEND_F_ACTIVE, BACKEND_F_IN_RING, Backend, RING_EMPTY, VipKey, addr_from_map};
use serde_json::{Value, json};

use crate::{
    cli::{DumpArgs, DumpWhat, PinArgs},
    dataplane::{BackendRecord, Maps, vip_figures},
    l4::{Proto, VipAddr, flows::monotonic_ns},
};

/// An address of the maps as text (`?` for a family byte that is neither).
fn addr_text(family: u8, words: [u32; 4]) -> String {
    addr_from_map(family, words).map_or_else(|| "?".to_owned(), |a| a.to_string())
}

/// `ADDR:PORT` (IPv6 in brackets) of an address and a network-order port of the maps.
fn socket_text(family: u8, words: [u32; 4], port_be: u16) -> String {
    addr_from_map(family, words).map_or_else(
        || format!("?:{}", u16::from_be(port_be)),
        |a| SocketAddr::new(a, u16::from_be(port_be)).to_string(),
    )
}

fn vip_addr(k: &VipKey) -> String {
    VipAddr::from_map_key(k).map_or_else(
        || {
            format!(
                "{}/proto-{}",
                socket_text(k.family, k.addr, k.port),
                k.proto
            )
        },
        |v| v.to_string(),
    )
}

/// `ADDR:PORT` of a backend entry.
fn backend_addr(b: &Backend) -> String {
    socket_text(b.family, b.addr, b.port)
}

fn backend_json(r: &BackendRecord) -> Value {
    let (id, b, c) = (r.id, &r.backend, &r.counters);
    json!({
        "id": id,
        "addr": addr_text(b.family, b.addr),
        "port": u16::from_be(b.port),
        "vip_id": b.vip_id,
        "weight": b.weight,
        // Takes new flows / keeps forwarding the flows pinned to it (draining: only the
        // latter).
        "in_ring": b.flags & BACKEND_F_IN_RING != 0,
        "active": b.flags & BACKEND_F_ACTIVE != 0,
        "packets": c.packets,
        "bytes": c.bytes,
        "new_flows": c.new_flows,
        "reply_packets": c.reply_packets,
        "reply_bytes": c.reply_bytes,
    })
}

/// Registered backends: (id, entry) for every non-empty slot of LB_BACKENDS.
fn backends(maps: &Maps) -> anyhow::Result<Vec<(u32, Backend)>> {
    Ok(maps.backend_entries()?)
}

/// The flow table's size and what the sweeper of `lb run` found (see `l4::flows`).
fn flow_table_json(maps: &Maps) -> anyhow::Result<Value> {
    let s = maps.flow_table_stats()?;
    let now = monotonic_ns();
    Ok(json!({
        "capacity": maps.flow_capacity()?,
        "entries": s.entries,
        "inserted": maps.flow_inserts()?,
        "expired": s.expired,
        "deleted": s.deleted,
        "evicted_live": s.evicted_live,
        // NAT: reverse (reply) entries after the last sweep, one per live NAT flow.
        "nat_reverse_entries": s.nat_entries,
        "swept_s_ago": (s.swept_ns != 0).then(|| now.saturating_sub(s.swept_ns) as f64 / 1e9),
    }))
}

/// The next-hop cache's settings and counters.
fn nexthop_cache_json(maps: &Maps) -> anyhow::Result<Value> {
    let cfg = maps.lb_config()?;
    let mut v = json!({
        "enabled": cfg.nexthop_max_age_ns != 0,
        "max_age_s": cfg.nexthop_max_age_ns as f64 / 1e9,
        "generation": cfg.nexthop_generation,
    });
    for (c, total) in maps.nexthop_totals()? {
        v[c.label()] = json!(total);
    }
    Ok(v)
}

/// Interface name of an index, or its number if it has none here (another namespace).
fn iface_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return ifindex.to_string();
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn mac_text(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// `lb dump nexthops`: one row per backend and CPU that holds a cached next hop resolved for
/// the backend's current address, with whether it is still valid.
fn nexthops_json(maps: &Maps) -> anyhow::Result<Value> {
    let cfg = maps.lb_config()?;
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for (id, b) in backends(maps)? {
        for (cpu, e) in maps.nexthops_of(id)?.into_iter().enumerate() {
            if e.family == 0 || e.family != b.family || e.addr != b.addr {
                continue; // never filled on this CPU, or for an earlier owner of the id
            }
            let age = now.saturating_sub(e.resolved_ns);
            rows.push(json!({
                "backend_id": id,
                "backend": addr_text(b.family, b.addr),
                "cpu": cpu,
                "ifindex": e.ifindex,
                "iface": iface_name(e.ifindex),
                "dmac": mac_text(e.dmac),
                "smac": mac_text(e.smac),
                "ingress_iface": iface_name(e.ingress_ifindex),
                "max_len": e.max_len,
                "generation": e.generation,
                "age_s": age as f64 / 1e9,
                // What lb_xdp would decide for a packet that fits max_len.
                "valid": cfg.nexthop_max_age_ns != 0 && e.generation == cfg.nexthop_generation && age <= cfg.nexthop_max_age_ns,
            }));
        }
    }
    Ok(Value::Array(rows))
}

/// Everything `lb stats` shows, as JSON.
pub fn stats_json(maps: &Maps) -> anyhow::Result<Value> {
    // Every backend's entry and record, read once: the VIP figures, the backend rows and
    // the derived reasons agree with one another.
    let records = maps.backend_records()?;
    let mut vips = Vec::new();
    let mut keys: Vec<(VipKey, u32)> = Vec::new();
    for entry in maps.vips.iter() {
        let (k, v) = entry.context("reading LB_VIPS")?;
        if k.proto == lb_common::VIP_MARKER_PROTO {
            continue; // address marker, not a VIP
        }
        keys.push((k, v.vip_id));
    }
    keys.sort_by_key(|(_, id)| *id);
    for (k, id) in keys {
        let c = vip_figures(id, &records, maps.retired_counters(Some(id))?);
        let g = maps.guard_counters(id)?;
        let meta = maps.vips.get(&k, 0).context("reading LB_VIPS")?;
        let bs: Vec<Value> = records
            .iter()
            .filter(|r| r.backend.vip_id == id)
            .map(backend_json)
            .collect();
        vips.push(json!({
            "vip": vip_addr(&k),
            "id": id,
            "packets": c.packets,
            "bytes": c.bytes,
            "new_flows": c.new_flows,
            "unhealthy_routing_flows": c.unhealthy_routing_flows,
            "mode": if meta.flags & lb_common::VIP_F_NAT != 0 { "nat" } else { "dsr" },
            // NAT: the targets' replies translated back (DSR replies bypass the balancer).
            "reply_packets": c.reply_packets,
            "reply_bytes": c.reply_bytes,
            // Packets the VIP's guards dropped, by reason (the reason counters of the same
            // names count them over all VIPs).
            "guards": {
                "drop_not_allowed": g.not_allowed,
                "drop_denied": g.denied,
                "drop_rate_limited": g.rate_limited,
            },
            "backends": bs,
        }));
    }
    let reasons: serde_json::Map<String, Value> = maps
        .reason_totals_of(&records)?
        .into_iter()
        .map(|(r, n)| (r.label().to_string(), json!(n)))
        .collect();
    let probes: serde_json::Map<String, Value> = maps
        .hc_totals()?
        .into_iter()
        .map(|(r, n)| (r.label().to_string(), json!(n)))
        .collect();
    Ok(json!({
        "vips": vips,
        "reasons": reasons,
        "health_check_probes": probes,
        "flow_table": flow_table_json(maps)?,
        "nexthop_cache": nexthop_cache_json(maps)?,
    }))
}

/// A JSON counter as a number (tables pad numbers, which `Value`'s Display does not).
fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `lb stats`.
pub fn stats(args: &PinArgs) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(&args.pin_path)?;
    let v = stats_json(&maps)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<28} {:>12} {:>14} {:>10}",
        "VIP / BACKEND", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for vip in v["vips"].as_array().into_iter().flatten() {
        println!(
            "{:<28} {:>12} {:>14} {:>10}",
            vip["vip"].as_str().unwrap_or("?"),
            n(&vip["packets"]),
            n(&vip["bytes"]),
            n(&vip["new_flows"])
        );
        for b in vip["backends"].as_array().into_iter().flatten() {
            let addr = b["addr"].as_str().unwrap_or("?");
            let at = match addr.parse::<std::net::IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, n(&b["port"]) as u16).to_string(),
                Err(_) => format!("{addr}:{}", b["port"]),
            };
            let label = format!(
                "  {at} w{}{}",
                b["weight"],
                match (b["in_ring"].as_bool(), b["active"].as_bool()) {
                    (Some(true), _) => "",
                    (_, Some(true)) => " (draining)",
                    _ => " (out)",
                }
            );
            println!(
                "{:<28} {:>12} {:>14} {:>10}",
                label,
                n(&b["packets"]),
                n(&b["bytes"]),
                n(&b["new_flows"])
            );
        }
    }
    println!();
    println!("{:<28} {:>12}", "PACKET OUTCOME", "PACKETS");
    for (k, v) in v["reasons"].as_object().into_iter().flatten() {
        println!("{k:<28} {:>12}", n(v));
    }
    println!();
    println!("{:<28} {:>12}", "HEALTH-CHECK PROBE (TC)", "PACKETS");
    for (k, v) in v["health_check_probes"].as_object().into_iter().flatten() {
        println!("{k:<28} {:>12}", n(v));
    }
    let ft = &v["flow_table"];
    println!();
    println!("{:<28} {:>12}", "FLOW TABLE", "");
    println!(
        "{:<28} {:>12}",
        "entries (last sweep)",
        format!("{} / {}", n(&ft["entries"]), n(&ft["capacity"]))
    );
    for k in ["inserted", "expired", "evicted_live"] {
        println!("{k:<28} {:>12}", n(&ft[k]));
    }
    let nh = &v["nexthop_cache"];
    println!();
    println!("{:<28} {:>12}", "NEXT-HOP CACHE", "");
    println!(
        "{:<28} {:>12}",
        "max age (s)",
        if nh["enabled"].as_bool() == Some(true) {
            nh["max_age_s"].to_string()
        } else {
            "off".to_owned()
        }
    );
    for k in ["generation", "nexthop_lookups", "nexthop_cached"] {
        println!("{k:<28} {:>12}", n(&nh[k]));
    }
    Ok(())
}

/// The sources the new-flow rate limit dropped most, busiest first: VIP, source, new flows
/// dropped in total, and how long ago the last one was.
fn limited_json(maps: &Maps, top: usize) -> anyhow::Result<Value> {
    let mut vip_names: HashMap<u32, String> = HashMap::new();
    for e in maps.vips.iter() {
        let (k, v) = e.context("reading LB_VIPS")?;
        if k.proto != lb_common::VIP_MARKER_PROTO {
            vip_names.insert(v.vip_id, vip_addr(&k));
        }
    }
    let now = monotonic_ns();
    let mut rows: Vec<(u64, Value)> = Vec::new();
    for e in maps.rate.iter() {
        // An entry the LRU evicts while we walk is simply gone.
        let Ok((k, v)) = e else { continue };
        if v.dropped == 0 {
            continue;
        }
        rows.push((
            v.dropped,
            json!({
                "vip": vip_names.get(&k.vip_id).cloned().unwrap_or_else(|| format!("id {}", k.vip_id)),
                "source": addr_text(k.family, k.addr),
                "new_flows_dropped": v.dropped,
                "last_drop_s_ago": now.saturating_sub(v.last_drop_ns) as f64 / 1e9,
            }),
        ));
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    Ok(Value::Array(
        rows.into_iter().take(top).map(|(_, v)| v).collect(),
    ))
}

/// `lb dump …`.
pub fn dump(args: &DumpArgs) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(&args.pin.pin_path)?;
    let json = args.pin.json;
    let out: Value = match &args.what {
        DumpWhat::Vips => {
            let mut rows = Vec::new();
            for e in maps.vips.iter() {
                let (k, v) = e.context("reading LB_VIPS")?;
                if k.proto == lb_common::VIP_MARKER_PROTO {
                    continue; // address marker, not a VIP
                }
                rows.push(json!({
                    "vip": vip_addr(&k),
                    "id": v.vip_id,
                    "flags": v.flags,
                    "idle_timeout_s": v.idle_timeout_ns as f64 / 1e9,
                }));
            }
            Value::Array(rows)
        }
        DumpWhat::Backends => {
            Value::Array(maps.backend_records()?.iter().map(backend_json).collect())
        }
        DumpWhat::Flows => {
            let now = monotonic_ns();
            let all = backends(&maps)?;
            let mut timeouts: HashMap<u32, u64> = HashMap::new();
            for e in maps.vips.iter() {
                let (_, m) = e.context("reading LB_VIPS")?;
                timeouts.insert(m.vip_id, m.idle_timeout_ns);
            }
            let mut rows = Vec::new();
            for e in maps.flows.iter() {
                // An entry evicted or expired while we walk is simply gone.
                let Ok((k, v)) = e else { continue };
                let backend = all
                    .iter()
                    .find(|(id, _)| *id == v.backend_id)
                    .map(|(_, b)| addr_text(b.family, b.addr));
                let idle = now.saturating_sub(v.last_seen_ns);
                // An expired entry is still in the table until the sweeper deletes it, but
                // its next packet is steered as a new flow.
                let expired = timeouts.get(&v.vip_id).is_some_and(|&t| t != 0 && idle > t);
                rows.push(json!({
                    "client": socket_text(k.family, k.src_addr, k.src_port),
                    "vip": socket_text(k.family, k.dst_addr, k.dst_port),
                    "proto": Proto::from_number(k.proto).map_or_else(|| k.proto.to_string(), |p| p.to_string()),
                    "backend_id": v.backend_id,
                    "backend": backend,
                    "age_s": now.saturating_sub(v.created_ns) as f64 / 1e9,
                    "idle_s": idle as f64 / 1e9,
                    "idle_timeout_s": timeouts.get(&v.vip_id).map(|&t| t as f64 / 1e9),
                    "expired": expired,
                }));
            }
            Value::Array(rows)
        }
        DumpWhat::Limited { top } => limited_json(&maps, *top)?,
        DumpWhat::Nexthops => nexthops_json(&maps)?,
        DumpWhat::Ring { vip, slots } => {
            let addr: VipAddr = vip
                .parse()
                .map_err(|e| anyhow::anyhow!("VIP {vip:?}: {e}"))?;
            let key = addr.map_key();
            let meta = maps
                .vips
                .get(&key, 0)
                .with_context(|| format!("VIP {vip} is not configured"))?;
            let ring_size = maps.lb_config()?.ring_size;
            let base = meta.vip_id * ring_size;
            let mut table = Vec::with_capacity(ring_size as usize);
            for s in 0..ring_size {
                table.push(maps.rings.get(&(base + s), 0).context("reading LB_RINGS")?);
            }
            if *slots {
                Value::Array(table.iter().map(|&id| json!(id)).collect())
            } else {
                let mut rows = Vec::new();
                for (id, b) in backends(&maps)?
                    .into_iter()
                    .filter(|(_, b)| b.vip_id == meta.vip_id)
                {
                    let n = table.iter().filter(|&&s| s == id).count();
                    rows.push(json!({
                        "backend_id": id,
                        "backend": backend_addr(&b),
                        "weight": b.weight,
                        "slots": n,
                        "share": n as f64 / f64::from(ring_size),
                    }));
                }
                let empty = table.iter().filter(|&&s| s == RING_EMPTY).count();
                rows.push(json!({"backend_id": null, "backend": "(empty)", "slots": empty}));
                Value::Array(rows)
            }
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for row in out.as_array().into_iter().flatten() {
            match row {
                Value::Object(o) => {
                    let line: Vec<String> = o.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("{}", line.join(" "));
                }
                other => println!("{other}"),
            }
        }
    }
    Ok(())
}

#!/usr/bin/env python3
"""Where an HTTP/1.1 proxy's latency tail comes from: reads an `h2load --log-file` (per request:
start µs since the epoch, status, duration µs) and, optionally, a `perf sched timehist` text of
the same seconds (recorded with `-k CLOCK_MONOTONIC`), and prints

  - the latency distribution: p50 / p90 / p99 / p99.9 / max, mean, p99 ÷ mean;
  - stalls: gaps between two successive completions longer than 0.5 / 1 / 2 ms (at ~50k req/s a
    completion comes every ~20 µs, so a 1 ms gap means nothing completed on any connection);
  - bursts: the slow requests (above p99) grouped by completion time (a new group after 1 ms
    with no slow completion): groups per second, their size (requests) and length; a stall of
    the whole proxy shows as groups of many requests, queueing order as groups of one or two;
  - with the scheduler trace: the slow requests outside big bursts, and how many of them lived
    through a proxy thread's runnable wait of 0.5 ms or more (preempted) or not (an order inside
    the proxy); during the stalls and in the bursts' waiting windows, what the proxy's threads, the client and the
    backend were doing (running / runnable, waiting for a CPU / sleeping), and the proxy's
    runnable waits longer than 0.5 ms per second.

Used by `h1-kernel-side.py --h2load-log` (issue 8, BENCHMARKS.md "HTTP/1.1 tail latency: where
it comes from (stop 27)"); standalone: h1_tail.py LOG [TIMEHIST MONO_TO_REALTIME_OFFSET_S PROXY_TIDS];
h1_tail.py --summary OUTPUT: per arm of an h1-kernel-side.py output, the medians over rounds of
p99 ÷ mean (mean = 64 ÷ req/s), p99 and user + system µs per request
"""
import bisect, collections, re, sys


def read_log(path, skip_s=1.0):
    rows = []
    for line in open(path):
        f = line.split()
        if len(f) >= 3 and f[1] == "200":
            rows.append((int(f[0]), int(f[2])))
    rows.sort()
    if not rows:
        return rows
    t0 = rows[0][0] + int(skip_s * 1e6)  # the first second: connections opening, caches warming
    return [r for r in rows if r[0] >= t0]


def pct(sorted_vals, q):
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def distribution(rows):
    d = sorted(r[1] for r in rows)
    span = (max(s + l for s, l in rows) - rows[0][0]) / 1e6
    mean = sum(d) / len(d)
    return {"n": len(d), "secs": span, "rate": len(d) / span, "p50": pct(d, .5), "p90": pct(d, .9),
            "p99": pct(d, .99), "p999": pct(d, .999), "max": d[-1], "mean": mean}


def stalls(rows, limits=(500, 1000, 2000)):
    ends = sorted(s + l for s, l in rows)
    gaps = [(b - a, a, b) for a, b in zip(ends, ends[1:])]
    return {lim: [g for g in gaps if g[0] > lim] for lim in limits}, max(g[0] for g in gaps)


def bursts(rows, p99, merge_us=1000):
    slow = sorted((s + l, s, l) for s, l in rows if l > p99)
    groups, cur = [], []
    for e in slow:
        if cur and e[0] - cur[-1][0] > merge_us:
            groups.append(cur)
            cur = []
        cur.append(e)
    if cur:
        groups.append(cur)
    return groups


def timehist(path, offset_s):
    """Per tid: (comm, sorted list of (start_us, end_us, state)) in the log's clock (realtime µs);
    state 'S' sleeping, 'R' runnable (waiting for a CPU), 'X' running."""
    per = collections.defaultdict(list)
    comm = {}
    rx = re.compile(r"^\s*(\d+\.\d+)\s+\[\d+\]\s+(.+?)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")
    for line in open(path):
        m = rx.match(line)
        if not m:
            continue
        t = (float(m.group(1)) + offset_s) * 1e6
        tid = int(m.group(3))
        wait, delay, run = (float(m.group(i)) * 1e3 for i in (5, 6, 7))
        comm[tid] = m.group(2).strip()
        # timehist's wait time is all the time off the CPU (since the last switch-out), and
        # includes the scheduling delay (wake-up or preemption to switch-in)
        per[tid].append((t - run - wait, t - run - delay, "S"))
        per[tid].append((t - run - delay, t - run, "R"))
        per[tid].append((t - run, t, "X"))
    for v in per.values():
        v.sort()
    return comm, per


def overlap(intervals, a, b):
    """Time (µs) of each state of one thread inside [a, b]."""
    out = collections.Counter()
    starts = [i[0] for i in intervals]
    k = max(0, bisect.bisect_left(starts, a) - 3)
    while k < len(intervals) and intervals[k][0] < b:
        s, e, st = intervals[k]
        o = min(e, b) - max(s, a)
        if o > 0:
            out[st] += o
        k += 1
    return out


def classify(comm, tid, proxy_tids):
    if tid in proxy_tids:
        return "proxy"
    c = comm.get(tid, "")
    if c.startswith("h2load"):
        return "client"
    if c.startswith("nginx"):
        return "backend"
    return None


def report(log, sched=None, offset_s=0.0, proxy_tids=(), name="", out=sys.stdout):
    rows = read_log(log)
    if len(rows) < 1000:
        print(f"   h2load {name}: too few requests logged ({len(rows)})", file=out)
        return
    d = distribution(rows)
    p = lambda us: f"{us / 1e3:.2f}"
    print(f"   h2load {name}: {d['n']} req in {d['secs']:.1f} s ({d['rate'] / 1e3:.1f}k/s); latency ms p50 {p(d['p50'])}"
          f" p90 {p(d['p90'])} p99 {p(d['p99'])} p99.9 {p(d['p999'])} max {p(d['max'])}; mean {p(d['mean'])};"
          f" p99/mean {d['p99'] / d['mean']:.2f}", file=out)
    st, maxgap = stalls(rows)
    print("   stalls (no completion on any connection) per s: " + "  ".join(
        f">{lim / 1e3:g}ms {len(g) / d['secs']:.1f} ({sum(x[0] for x in g) / d['secs'] / 1e4:.2f}% of time)"
        for lim, g in st.items()) + f"; longest {p(maxgap)} ms", file=out)
    gs = bursts(rows, d["p99"])
    sizes = sorted(len(g) for g in gs)
    big = [g for g in gs if len(g) >= 16]
    in_big = sum(len(g) for g in big)
    lens = sorted((g[-1][0] - g[0][0]) for g in gs)
    print(f"   slow (>p99) requests: {sum(sizes)} in {len(gs)} bursts ({len(gs) / d['secs']:.1f}/s); burst size median"
          f" {pct(sizes, .5)}, p90 {pct(sizes, .9)}, max {sizes[-1]}; length median {p(pct(lens, .5))} ms, max"
          f" {p(lens[-1])} ms; {in_big / max(1, sum(sizes)):.0%} of them in {len(big)} bursts of >= 16", file=out)
    if not sched:
        return
    comm, per = timehist(sched, offset_s)
    pt = set(proxy_tids)
    for lim in (1000, 500):
        wins = [(a, b) for _, a, b in st[lim]]
        if wins:
            break
    tot = collections.defaultdict(collections.Counter)
    span = sum(b - a for a, b in wins)
    for tid, iv in per.items():
        who = classify(comm, tid, pt)
        if not who:
            continue
        for a, b in wins:
            tot[(who, tid)].update(overlap(iv, a, b))
    print(f"   during the {len(wins)} stalls > {lim / 1e3:g} ms ({span / 1e3:.1f} ms in all), share of the time each thread was"
          " running X / runnable R / sleeping S (threads seen by the trace):", file=out)
    for (who, tid), c in sorted(tot.items()):
        s = sum(c.values()) or 1
        if s < span * 0.05:
            continue
        print(f"     {who:7} {comm[tid][:16]:16} [{tid}]: X {c['X'] / span:.2f} R {c['R'] / span:.2f} S {c['S'] / span:.2f}", file=out)
    # the bursts of slow requests: the window all of a burst's requests were waiting in (from
    # the median start to the first completion), and what each thread did in it
    wins = []
    for g in gs:
        if len(g) < 16:
            continue
        starts = sorted(x[1] for x in g)
        a, b = starts[len(starts) // 2], g[0][0]
        if b > a:
            wins.append((a, b))
    span = sum(b - a for a, b in wins)
    tot = collections.defaultdict(collections.Counter)
    for tid, iv in per.items():
        who = classify(comm, tid, pt)
        if who:
            for a, b in wins:
                tot[(who, tid)].update(overlap(iv, a, b))
    print(f"   in the {len(wins)} bursts of >= 16 slow requests (waiting windows {span / 1e3:.1f} ms in all,"
          f" median {pct(sorted(b - a for a, b in wins), .5) / 1e3 if wins else 0:.2f} ms), share of the time each thread was X / R / S:", file=out)
    for (who, tid), c in sorted(tot.items()):
        if sum(c.values()) < span * 0.05:
            continue
        print(f"     {who:7} {comm[tid][:16]:16} [{tid}]: X {c['X'] / span:.2f} R {c['R'] / span:.2f} S {c['S'] / span:.2f}", file=out)
    # the slow requests outside those bursts: how many of them lived through a runnable wait of
    # a proxy thread of 0.5 ms or more (preemption) and how many did not (an order inside the proxy)
    runs = {tid: sorted((s_, e) for s_, e, stt in per.get(tid, []) if stt == "R" and e - s_ >= 500) for tid in pt}
    iso = [e for g in gs if len(g) < 16 for e in g]
    hit = 0
    for end, start, _ in iso:
        for r in runs.values():
            k = bisect.bisect_left(r, (end,))
            if any(s_ < end and e > start for s_, e in r[max(0, k - 8):k]):
                hit += 1
                break
    print(f"   slow requests outside bursts of >= 16: {len(iso)} ({len(iso) / d['secs']:.0f}/s); {hit} of them"
          f" ({hit / max(1, len(iso)):.0%}) lived through a proxy thread's runnable wait >= 0.5 ms", file=out)
    # the proxy's long runnable waits over the whole run
    t0, t1 = rows[0][0], rows[-1][0]
    long_r = collections.Counter()
    for tid in pt:
        for s, e, stt in per.get(tid, []):
            if stt == "R" and s >= t0 and e <= t1:
                for lim2 in (500, 1000, 2000):
                    if e - s > lim2:
                        long_r[lim2] += 1
    secs = (t1 - t0) / 1e6
    print("   proxy threads' runnable waits per s: " + "  ".join(f">{k / 1e3:g}ms {v / secs:.1f}" for k, v in sorted(long_r.items())), file=out)


def summary(path, out=sys.stdout):
    """Per arm of an h1-kernel-side.py output: medians (and ranges) over the rounds of p99 ÷ mean,
    p99 and user + system µs per request, and the rounds' values in order."""
    rx = re.compile(r"^(\S+)\s+r(\d+) req\s+(\d+) \(([\d.]+)k/s\) p99\s+([\d.]+)(ms|us|s)\s+usr\s+([\d.]+) sys\s+([\d.]+)")
    arms = collections.defaultdict(list)
    for line in open(path):
        m = rx.match(line)
        if not m:
            continue
        rate = float(m.group(4)) * 1e3
        p99 = float(m.group(5)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(6)]
        mean = 64 / rate * 1e3
        arms[m.group(1)].append((p99 / mean, p99, float(m.group(7)) + float(m.group(8)), rate))
    med = lambda v: sorted(v)[len(v) // 2] if len(v) % 2 else sum(sorted(v)[len(v) // 2 - 1:len(v) // 2 + 1]) / 2
    for arm, v in arms.items():
        r, p, c, q = zip(*v)
        print(f"{arm:10} rounds {len(v)}  p99/mean median {med(r):.2f} ({min(r):.2f}-{max(r):.2f}) [{', '.join(f'{x:.2f}' for x in r)}]"
              f"  p99 ms {med(p):.2f}  usr+sys us/req {med(c):.1f} ({min(c):.1f}-{max(c):.1f})  req/s {med(q) / 1e3:.1f}k", file=out)


if __name__ == "__main__":
    a = sys.argv[1:]
    if a and a[0] == "--summary":
        summary(a[1])
    elif len(a) >= 4:
        report(a[0], a[1], float(a[2]), [int(x) for x in a[3].split(",")])
    else:
        report(a[0])

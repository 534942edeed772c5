#!/usr/bin/env python3
"""Medians over rounds of an `h1-kernel-side.py --react` output, per arm: the wrk pass's req/s,
p99, p99 ÷ mean (mean = 64 ÷ req/s, as `h1_tail.py --summary`), user + system µs per request,
and the traced pass's reaction delay per side (p50 / p99 / p99.9 µs, reads > 1 ms per second and
the reading thread's state for those: running the whole time / preempted / asleep). With a
`haproxy` arm, also in how many rounds each arm's wrk p99 was below HAProxy's of the same round
(issue 8's "p99 no worse than HAProxy's", judged round by round as in stop 40).

usage: h1_react_summary.py OUTPUT.txt
"""
import collections, re, statistics, sys


def ms(x):
    return float(x[:-2]) if x.endswith("ms") else float(x[:-2]) / 1000 if x.endswith("us") else float(x[:-1]) * 1000


def main(path):
    arms = collections.OrderedDict()
    cur = None
    for line in open(path):
        m = re.match(r"^(\S+)\s+r(\d+) req\s+(\d+) \(([\d.]+)k/s\) p99\s+(\S+)\s+usr\s+([\d.]+) sys\s+([\d.]+)", line)
        if m:
            cur = arms.setdefault(m.group(1), collections.defaultdict(list))
            cur["round"].append(int(m.group(2)))
            rps = float(m.group(4)) * 1000
            p99 = ms(m.group(5))
            cur["req/s"].append(rps)
            cur["p99 ms"].append(p99)
            cur["p99/mean"].append(p99 / (64 / rps * 1000))
            cur["usr+sys us"].append(float(m.group(6)) + float(m.group(7)))
            continue
        m = re.match(r"^\s+latency: p50 ([\d.]+(?:ms|us|s))\s", line)
        if m and cur is not None:
            cur["p50 ms"].append(ms(m.group(1)))
            continue
        m = re.match(r"^\s+(?:react|peer|time)\s+(client|backend|wrk|nginx-be|req-in|be-rtt)\s*: reads [\d.]+/req\s+p50 (\d+) p90 \d+ p99 (\d+) p99.9 (\d+) us;"
                     r"\s+>1ms (\d+)/s(?:: running (\d+)% preempted (\d+)% .* asleep (\d+)%)?", line)
        if m and cur is not None:
            s = {"client": "c", "backend": "b", "wrk": "w", "nginx-be": "n", "req-in": "r", "be-rtt": "t"}[m.group(1)]
            for k, v in zip(("p50", "p99", "p99.9", ">1ms/s", "run%", "pre%", "slp%"), m.groups()[1:]):
                if v is None:
                    continue
                cur[f"{s} {k}"].append(float(v))
    keys = ["req/s", "p50 ms", "p99 ms", "p99/mean", "usr+sys us"] + [f"{s} {k}" for s in "cbwnrt" for k in
                                                          ("p50", "p99", "p99.9", ">1ms/s", "run%", "pre%", "slp%")]
    print("median (min-max) over rounds; c = client side, b = backend side reaction delay of the proxy; "
          "w = wrk reading responses, n = the backend nginx reading requests; "
          "r = req-in, a request's arrival at the proxy to its response's write; t = be-rtt, the proxy's "
          "write to the backend to the response's arrival (us)")
    print(f"{'':12}" + "".join(f"{a:>22}" for a in arms))
    for k in keys:
        if not any(a.get(k) for a in arms.values()):
            continue
        row = []
        for a in arms.values():
            v = a.get(k, [])
            if not v:
                row.append(f"{'-':>22}")
                continue
            fmt = "{:.2f}" if k in ("p50 ms", "p99 ms", "p99/mean") else "{:.1f}" if k == "usr+sys us" else "{:.0f}"
            row.append(f"{(fmt.format(statistics.median(v)) + ' (' + fmt.format(min(v)) + '-' + fmt.format(max(v)) + ')'):>22}")
        print(f"{k:12}" + "".join(row))
    ha = arms.get("haproxy")
    if ha:
        ha_p99 = dict(zip(ha["round"], ha["p99 ms"]))
        row = []
        for a in arms.values():
            paired = [(p, ha_p99[r]) for r, p in zip(a["round"], a["p99 ms"]) if r in ha_p99]
            row.append(f"{f'{sum(p < h for p, h in paired)} of {len(paired)}':>22}")
        print(f"{'p99<haproxy':12}" + "".join(row) + "   (rounds with the wrk p99 below HAProxy's of the same round)")


main(sys.argv[1])

#!/usr/bin/env python3
"""Self cost per request by function, every event, from the two profiles of
scripts/l7-instructions.sh: (OUT/callgrind.2n - OUT/callgrind.n) / N, so what the two loads
share (connection set-up, warm-up) cancels as in the script's own totals.
usage: callgrind-diff.py OUT N [EVENT [TOP [REGEX]]]
  EVENT: the column to sort by (Ir, I1mr, D1mr, D1mw, Bim, ...; default Ir); TOP rows
  (default 40); REGEX keeps only matching function names. Reads profiles made with or without
  --dump-instr=yes. Run l7-instructions.sh with CALLGRIND_OPTS="--cache-sim=yes
  --branch-sim=yes" for the cache and branch columns.
usage: callgrind-diff.py --compare OUT_A OUT_B N [EVENT [TOP [REGEX]]]
  Two builds (two runs of l7-instructions.sh with the same mode and N): each function's self
  cost per request (per connection for h1conn) in A and in B and B - A, sorted by the size of
  the difference, EVENT only (default Ir). Symbol hashes (::h0123...) are dropped so the same
  function of two builds matches; functions of the same name are summed."""
import re
import sys

from callgrind_profile import self_costs


def per_request(out, n):
    """(events, {function: [self cost per request]}) of OUT's two profiles."""
    events, a = self_costs(out + "/callgrind.n")
    _, b = self_costs(out + "/callgrind.2n")
    zero = [0] * len(events)
    return events, {f: [(y - x) / n for x, y in zip(a.get(f) or zero, b.get(f) or zero)]
                    for f in set(a) | set(b)}


if sys.argv[1] == "--compare":
    out_a, out_b, n = sys.argv[2], sys.argv[3], float(sys.argv[4])
    key = sys.argv[5] if len(sys.argv) > 5 else "Ir"
    top = int(sys.argv[6]) if len(sys.argv) > 6 else 40
    keep = re.compile(sys.argv[7]) if len(sys.argv) > 7 else None
    side = []
    for out in (out_a, out_b):
        events, d = per_request(out, n)
        i = events.index(key)
        merged = {}
        for f, v in d.items():
            g = re.sub(r"::h[0-9a-f]{16}\b", "", f)
            merged[g] = merged.get(g, 0) + v[i]
        side.append(merged)
    a, b = side
    print(f"{key} per request: A {sum(a.values()):,.0f}  B {sum(b.values()):,.0f}  "
          f"B - A {sum(b.values()) - sum(a.values()):,.0f}")
    print(f"{'A':>10} {'B':>10} {'B - A':>9}  function (self)")
    rows = sorted(set(a) | set(b), key=lambda f: -abs(b.get(f, 0) - a.get(f, 0)))
    if keep:
        rows = [f for f in rows if keep.search(f)]
    for f in rows[:top]:
        x, y = a.get(f, 0), b.get(f, 0)
        print(f"{x:10.1f} {y:10.1f} {y - x:9.1f}  {f[:140]}")
    sys.exit(0)

out, n = sys.argv[1], float(sys.argv[2])
key = sys.argv[3] if len(sys.argv) > 3 else "Ir"
top = int(sys.argv[4]) if len(sys.argv) > 4 else 40
keep = re.compile(sys.argv[5]) if len(sys.argv) > 5 else None
events, diff = per_request(out, n)
show = [e for e in ["Ir", "Dw", "I1mr", "D1mr", "D1mw", "Bc", "Bcm", "Bi", "Bim"] if e in events]
col = [events.index(e) for e in show]
print("per request, all functions: " + "  ".join(
    f"{e} {sum(v[i] for v in diff.values()):,.0f}" for e, i in zip(show, col)))
print(" ".join(f"{e:>7}" for e in show) + "  function (self)")
rows = sorted(diff.items(), key=lambda kv: -kv[1][events.index(key)])
if keep:
    rows = [kv for kv in rows if keep.search(kv[0])]
for f, v in rows[:top]:
    print(" ".join(f"{v[i]:7.1f}" for i in col) + "  " + f[:160])

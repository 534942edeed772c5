#!/usr/bin/env python3
"""Self cost per request by function, every event, from the two profiles of
scripts/l7-instructions.sh: (OUT/callgrind.2n - OUT/callgrind.n) / N, so what the two loads
share (connection set-up, warm-up) cancels as in the script's own totals.
usage: callgrind-diff.py OUT N [EVENT [TOP [REGEX]]]
  EVENT: the column to sort by (Ir, I1mr, D1mr, D1mw, Bim, ...; default Ir); TOP rows
  (default 40); REGEX keeps only matching function names. Reads profiles made with or without
  --dump-instr=yes. Run l7-instructions.sh with CALLGRIND_OPTS="--cache-sim=yes
  --branch-sim=yes" for the cache and branch columns."""
import re
import sys

from callgrind_profile import self_costs

out, n = sys.argv[1], float(sys.argv[2])
key = sys.argv[3] if len(sys.argv) > 3 else "Ir"
top = int(sys.argv[4]) if len(sys.argv) > 4 else 40
keep = re.compile(sys.argv[5]) if len(sys.argv) > 5 else None
events, a = self_costs(out + "/callgrind.n")
_, b = self_costs(out + "/callgrind.2n")
zero = [0] * len(events)
diff = {f: [(y - x) / n for x, y in zip(a.get(f) or zero, b.get(f) or zero)] for f in set(a) | set(b)}
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

#!/usr/bin/env python3
"""Self cost per function from a callgrind output file (callgrind_annotate 3.19 mixes
inclusive costs into its default listing). usage: callgrind-self.py FILE [N] [DIVISOR]
Prints the top N functions by self instructions, divided by DIVISOR (e.g. the request count)."""
import sys

from callgrind_profile import self_costs

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 60
div = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
events, costs = self_costs(path)
cost = {f: v[events.index("Ir")] for f, v in costs.items()}
total = sum(cost.values())
print(f"total self {total:,} ({total / div:,.0f} per unit)")
for f, c in sorted(cost.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{c / div:10,.0f} {100.0 * c / total:5.1f}%  {f}")

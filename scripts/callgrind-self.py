#!/usr/bin/env python3
"""Self cost per function from a callgrind output file (callgrind_annotate 3.19 mixes
inclusive costs into its default listing). usage: callgrind-self.py FILE [N] [DIVISOR]
Prints the top N functions by self instructions, divided by DIVISOR (e.g. the request count)."""
import re, sys
from collections import defaultdict

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 60
div = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
names = {}
cost = defaultdict(int)
fn = None
after_calls = False

def name(kind, rest):
    m = re.match(r"\((\d+)\)(?: (.*))?", rest)
    if not m:
        return rest
    key = (kind, m.group(1))
    if m.group(2) is not None:
        names[key] = m.group(2)
    return names.get(key, rest)

for line in open(path, errors="replace"):
    line = line.rstrip("\n")
    if line.startswith("fn="):
        fn = name("fn", line[3:])
        after_calls = False
    elif line.startswith(("cfn=", "cfi=", "cob=")):
        if line.startswith("cfn="):
            name("fn", line[4:])
    elif line.startswith("calls="):
        after_calls = True
    elif line and (line[0].isdigit() or line[0] in "+-*"):
        parts = line.split()
        if after_calls:
            after_calls = False  # the inclusive cost of the call: not self
            continue
        if fn is not None and len(parts) >= 2:
            cost[fn] += int(parts[1])
total = sum(cost.values())
print(f"total self {total:,} ({total / div:,.0f} per unit)")
for f, c in sorted(cost.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{c / div:10,.0f} {100.0 * c / total:5.1f}%  {f}")

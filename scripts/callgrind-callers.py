#!/usr/bin/env python3
"""Who calls a function, by inclusive cost of the calls. usage: callgrind-callers.py FILE REGEX DIVISOR"""
import re
import sys
from collections import defaultdict

from callgrind_profile import cost_lines

path, target, div = sys.argv[1], re.compile(sys.argv[2]), float(sys.argv[3])
acc = defaultdict(int)
for fn, cfn, _, costs, events in cost_lines(path):
    if cfn is not None and target.search(cfn):
        acc[fn] += costs[events.index("Ir")]
for f, c in sorted(acc.items(), key=lambda kv: -kv[1])[:15]:
    print(f"{c / div:8,.0f} {f}")

#!/usr/bin/env python3
"""Who calls a function, by inclusive cost of the calls. usage: callgrind-callers.py FILE REGEX DIVISOR"""
import re, sys
from collections import defaultdict
path, target, div = sys.argv[1], sys.argv[2], float(sys.argv[3])
names = {}
def name(rest):
    m = re.match(r"\((\d+)\)(?: (.*))?", rest)
    if not m: return rest
    if m.group(2) is not None: names[m.group(1)] = m.group(2)
    return names.get(m.group(1), rest)
fn=None; cfn=None; pending=False
acc=defaultdict(int)
for line in open(path, errors="replace"):
    line=line.rstrip("\n")
    if line.startswith("fn="): fn=name(line[3:])
    elif line.startswith("cfn="): cfn=name(line[4:])
    elif line.startswith("calls="): pending=True
    elif pending and line and (line[0].isdigit() or line[0] in "+-*"):
        pending=False
        if cfn and re.search(target, cfn): acc[fn]+=int(line.split()[1])
for f,c in sorted(acc.items(), key=lambda kv:-kv[1])[:15]: print(f"{c/div:8,.0f} {f}")

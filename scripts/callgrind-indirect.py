#!/usr/bin/env python3
"""Mispredicted indirect branches per request by the kind of instruction, from the two
profiles of scripts/l7-instructions.sh run with
CALLGRIND_OPTS="--cache-sim=yes --branch-sim=yes --dump-instr=yes".
usage: callgrind-indirect.py OUT N BINARY
Each instruction's Bim is (2N profile - N profile) / N; objdump of BINARY (the profiled
binary itself: callgrind's addresses are its own for lb's PIE under valgrind) says what the
instruction is: a jump table (`jmp *reg`), a call through the GOT (and to what: a function
inside the binary, which rustc's -Z plt=no and non-relaxable GOTPCREL relocations leave
indirect, or libc), a vtable call (`call *mem`), a function pointer (`call *reg`).
Note: valgrind predicts indirect branches with a 512-entry last-target table indexed by the
branch address (cg_branchpred.c), so fixed-target calls also count when they alias."""
import bisect
import re
import subprocess
import sys
from collections import defaultdict

from callgrind_profile import cost_lines


def per_instruction(path):
    """({instruction address: Bim}, {instruction address: function}) of the file at `path`."""
    cost, fnof, positions = defaultdict(int), {}, None
    for fn, cfn, pos, costs, events in cost_lines(path):
        if positions is None:
            positions = pos
        if cfn is None:
            cost[pos[0]] += costs[events.index("Bim")]
            fnof[pos[0]] = fn
    if positions is None or len(positions) < 2:
        sys.exit("the profile has no instruction addresses: run with --dump-instr=yes")
    return cost, fnof


out, n, binary = sys.argv[1], float(sys.argv[2]), sys.argv[3]
a, _ = per_instruction(out + "/callgrind.n")
b, fnof = per_instruction(out + "/callgrind.2n")
bim = {k: (b.get(k, 0) - a.get(k, 0)) / n for k in set(a) | set(b)}
dis = {}
for line in subprocess.run(["objdump", "-d", "--no-show-raw-insn", binary],
                           capture_output=True, text=True).stdout.splitlines():
    m = re.match(r"\s+([0-9a-f]+):\s+(.*)", line)
    if m:
        dis[int(m.group(1), 16)] = m.group(2).strip()
got = {}
for line in subprocess.run(["readelf", "-rW", binary], capture_output=True, text=True).stdout.splitlines():
    p = line.split()
    if len(p) >= 4 and re.fullmatch(r"[0-9a-f]{16}", p[0]):
        got[int(p[0], 16)] = ("local", int(p[-1], 16)) if "RELATIVE" in p[2] else ("import", p[4])
syms = []
for line in subprocess.run(["nm", "-n", "-C", binary], capture_output=True, text=True).stdout.splitlines():
    p = line.split(None, 2)
    if len(p) == 3 and p[1] in "tTwW":
        syms.append((int(p[0], 16), p[2]))
starts = [s for s, _ in syms]


def symbol(addr):
    i = bisect.bisect_right(starts, addr) - 1
    return syms[i][1] if i >= 0 else "?"


kinds, targets, sites = defaultdict(float), defaultdict(float), defaultdict(float)
for addr, v in bim.items():
    ins = dis.get(addr, "?")
    if "(%rip)" in ins:
        m = re.search(r"# ([0-9a-f]+)", ins)
        kind, target = got.get(int(m.group(1), 16), ("?", "?")) if m else ("?", "?")
        what = "jmp via GOT (tail call)" if ins.startswith("jmp") else "call via GOT"
        if kind == "local":
            kinds[what + " to a function in the binary"] += v
            targets[symbol(target)[:70]] += v
        else:
            kinds[what + " to a shared library"] += v
            targets[str(target)] += v
    elif ins.startswith("jmp"):
        kinds["jmp *reg (jump table: match, async state)"] += v
        sites[fnof.get(addr, "?")[:90]] += v
    elif "(%" in ins:
        kinds["call *mem (vtable: dyn, Bytes, waker)"] += v
        sites[fnof.get(addr, "?")[:90]] += v
    else:
        kinds["call *reg (function pointer)"] += v
print(f"mispredicted indirect branches per request: {sum(bim.values()):.1f}")
for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
    print(f"{v:7.1f}  {k}")
print("GOT call targets:")
for k, v in sorted(targets.items(), key=lambda kv: -kv[1])[:12]:
    print(f"{v:7.1f}  {k}")
print("jump tables and vtable calls, by function:")
for k, v in sorted(sites.items(), key=lambda kv: -kv[1])[:15]:
    print(f"{v:7.1f}  {k}")

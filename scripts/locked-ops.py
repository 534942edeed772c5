#!/usr/bin/env python3
"""Locked instructions executed per request, in total and by function, from the two profiles of
scripts/l7-instructions.sh made with per-instruction counts:
  CALLGRIND_OPTS="--dump-instr=yes" scripts/l7-instructions.sh BIN h1 N OUT
usage: locked-ops.py OUT N [TOP [CALLERS]]
  Per request = (count in OUT/callgrind.2n - count in OUT/callgrind.n) / N, as the script's
  own total, so what the two loads share (connection set-up, warm-up) cancels. TOP functions
  (default 30) are printed, sorted by their locked instructions per request; for the first
  CALLERS of them (default 10) also who called them, by calls per request (a locked
  instruction inlined into its caller has no call: the function is then its own site).
What counts as locked (Intel SDM vol. 3A, 9.1.2.1): an instruction with the `lock` prefix, and
`xchg` with a memory operand (locked implicitly). `cmpxchg` or `xadd` without `lock` is not.
Each object the profile names (ob=: the binary, libc, ...) is disassembled with
`objdump -d --no-show-raw-insn`; callgrind writes an instruction's address relative to its
object's load bias, which is objdump's address for both a PIE binary and a shared library.
An address the disassembly does not know is counted and reported as unmapped (it should be 0)."""
import os
import re
import subprocess
import sys
from collections import defaultdict

INSN = re.compile(r"^\s*([0-9a-f]+):\s+(.*)$")


def locked_addresses(obj):
    """(set of the addresses of obj's locked instructions, set of all its instruction addresses),
    or (None, None) when obj cannot be disassembled."""
    if not os.path.exists(obj):
        return None, None
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj], capture_output=True,
                         text=True, errors="replace").stdout
    locked, every = set(), set()
    pending = False  # a `lock` objdump printed on its own line: it belongs to the next one
    for line in out.splitlines():
        m = INSN.match(line)
        if not m:
            continue
        addr, text = int(m.group(1), 16), m.group(2).split("#")[0].strip()
        every.add(addr)
        words = text.split()
        if not words:
            continue
        mnem = [w for w in words if w not in ("xacquire", "xrelease", "notrack", "bnd", "ds", "cs")]
        if mnem == ["lock"]:
            pending = True
            continue
        is_lock = "lock" in mnem or (mnem and mnem[0].startswith("xchg") and "(" in text)
        if is_lock or pending:
            locked.add(addr)
        pending = False
    return locked, every


def parse(path):
    """{(ob, fn, addr): self Ir} and {(callee, caller): calls} of one profile."""
    names = {}

    def name(kind, rest):
        m = re.match(r"\((\d+)\)(?: (.*))?", rest)
        if not m:
            return rest
        if m.group(2) is not None:
            names[(kind, m.group(1))] = m.group(2)
        return names.get((kind, m.group(1)), rest)

    own, calls = defaultdict(int), defaultdict(int)
    events, positions, last = [], [], [0]
    ob = fn = cfn = None
    call = 0  # 1 while the line after calls= (the call's inclusive cost) is pending
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("positions:"):
            positions = line.split()[1:]
            last = [0] * len(positions)
        elif line.startswith("ob="):
            ob = name("ob", line[3:])
        elif line.startswith("fn="):
            fn, call = name("fn", line[3:]), 0
        elif line.startswith("cob="):
            name("ob", line[4:])
        elif line.startswith("cfn="):
            cfn = name("fn", line[4:])
        elif line.startswith(("cfi=", "cfl=")):
            pass
        elif line.startswith(("fl=", "fi=", "fe=")):
            name("fl", line[3:])
        elif line.startswith("calls="):
            calls[(cfn, fn)] += int(line[6:].split()[0])
            call = 1
        elif line and (line[0].isdigit() or line[0] in "+-*"):
            p = line.split()
            for i, t in enumerate(p[: len(last)]):
                if t != "*":
                    last[i] = last[i] + int(t, 0) if t[0] in "+-" else int(t, 0)
            if call:
                call = 0
                continue
            ir = int(p[len(last)]) if len(p) > len(last) else 0
            own[(ob, fn, last[0])] += ir
    if positions[:1] != ["instr"]:
        sys.exit(f"{path}: no per-instruction counts (positions: {' '.join(positions)}); "
                 'run l7-instructions.sh with CALLGRIND_OPTS="--dump-instr=yes"')
    if events[:1] != ["Ir"]:
        sys.exit(f"{path}: the first event is {events[:1]}, not Ir")
    return own, calls


def short(f):
    return re.sub(r"::h[0-9a-f]{16}$", "", f or "?")


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    ncallers = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    a_own, a_calls = parse(out + "/callgrind.n")
    b_own, b_calls = parse(out + "/callgrind.2n")
    objs = {k[0] for k in a_own} | {k[0] for k in b_own}
    dis = {o: locked_addresses(o) for o in objs}
    by_fn, by_obj = defaultdict(float), defaultdict(float)
    ir_total = 0.0
    unmapped = defaultdict(float)
    sites = defaultdict(float)
    for key in set(a_own) | set(b_own):
        ob, fn, addr = key
        d = (b_own.get(key, 0) - a_own.get(key, 0)) / n
        ir_total += d
        locked, every = dis[ob]
        if every is None or addr not in every:
            unmapped[ob] += d
            continue
        if addr in locked:
            by_fn[short(fn)] += d
            by_obj[os.path.basename(ob)] += d
            sites[(short(fn), addr)] += d
    total = sum(by_fn.values())
    print(f"{out}: {ir_total:,.0f} instructions/request, {total:,.1f} of them locked")
    for o, c in sorted(by_obj.items(), key=lambda kv: -kv[1]):
        print(f"  {c:8.1f}  in {o}")
    for o, c in sorted(unmapped.items(), key=lambda kv: -abs(kv[1])):
        if abs(c) >= 0.5:
            print(f"  {c:8.1f}  instructions/request at addresses not disassembled, in {o}")
    print(f"\nlocked/request  sites  function (top {top})")
    ranked = sorted(by_fn.items(), key=lambda kv: -kv[1])
    for f, c in ranked[:top]:
        if abs(c) < 0.05:
            break
        k = sum(1 for (g, _), v in sites.items() if g == f and abs(v) >= 0.05)
        print(f"{c:14.2f}  {k:5d}  {f}")
    callers = defaultdict(lambda: defaultdict(float))
    for (callee, caller) in set(a_calls) | set(b_calls):
        d = (b_calls.get((callee, caller), 0) - a_calls.get((callee, caller), 0)) / n
        callers[short(callee)][short(caller)] += d
    print(f"\ncallers of the first {ncallers} (calls/request)")
    for f, c in ranked[:ncallers]:
        cs = sorted(((v, g) for g, v in callers[f].items() if abs(v) >= 0.05), reverse=True)
        print(f"{c:8.2f} {f}")
        if not cs:
            print("           (no calls counted: inlined into this function)")
        for v, g in cs[:5]:
            print(f"           {v:6.2f} from {g}")


main()

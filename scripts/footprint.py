#!/usr/bin/env python3
"""What one request touches: reads scripts/l7-footprint.sh's trace.

usage: scripts/footprint.py OUT LB_BIN REQUESTS [TOP]

Prints, per request of the measured part: the data accesses, the distinct 64-byte lines one
request touches (the footprint: the distinct lines of a window of the trace as long as an
average request's accesses, averaged over the windows of the measured part's second half; not
aligned to a request's start, so an estimate, with the windows' spread), by region (`stack`:
valgrind's 2 MiB thread stacks; `heap`: the anonymous mappings of 1 GiB or more, mimalloc's
arena; the binary's and libraries' mappings by name), and the misses of two simulated L1
data caches of 32 KiB with LRU replacement: the shape of the VM of stops 30-38 (8 ways, 64
sets) and a fully associative one (what is left there is capacity, not conflict), and the
L1 data cache of the machine the script runs on when sysfs gives another shape (stop 39's VM:
48 KiB, 12 ways, 64 sets), each over the measured part
with its first half as warm-up. Then the functions (by the instruction that made the access,
symbolised with `nm`) with the most misses, and those that touch the most stack lines in the
first request-long window of the second half. Then the footprint (and the stack table) without the worker's
parks: every access from the worker's park (tokio's `Context::park_internal` or
`transition_worker_to_parked`: the I/O driver's turn, the timer wheel, the clock, epoll_wait,
and any other thread that ran meanwhile, such as the metrics sampler) up to the next task it
runs (`Context::run_task`) is cut out, and the windows are as long as the rest's accesses per
request: how often the worker parks varies from run to run (more on a loaded machine), and
each park touched lines in some windows and not others. And the same per request, each
request's accesses (without the parks) from its `Exchange::start` to the next request's:
aligned to the requests, so without the windows' phase. Valgrind
loads a position-independent binary at 0x108000 (checked against OUT/maps).
"""
import bisect, collections, os, subprocess, sys

out, binp, nreq = sys.argv[1], sys.argv[2], int(sys.argv[3])
top = int(sys.argv[4]) if len(sys.argv) > 4 else 25
start, end = (int(open(f"{out}/{f}").read()) for f in ("start", "end"))
maps = []
for line in open(f"{out}/maps"):
    p = line.split()
    a, b = (int(x, 16) for x in p[0].split("-"))
    maps.append((a, b, p[5] if len(p) > 5 else "", p[1]))
maps.sort()
mstarts = [m[0] for m in maps]
base = min(a for a, b, n, _ in maps if n.endswith(binp.split("/")[-1]))


def region(addr):
    i = bisect.bisect_right(mstarts, addr) - 1
    if i < 0 or addr >= maps[i][1]:
        return "?"
    a, b, name, perm = maps[i]
    if not name:
        if b - a == 2 << 20:
            return "stack"
        return "heap" if b - a >= 1 << 30 else "anon"
    return f"{name.split('/')[-1]} {perm}"


syms = []
for line in subprocess.run(["nm", "-n", "--defined-only", "-C", binp], capture_output=True,
                           text=True, check=True).stdout.splitlines():
    p = line.split(" ", 2)
    if len(p) == 3 and p[1] in "tTwW":
        syms.append((int(p[0], 16) + base, p[2]))
sstarts = [s[0] for s in syms]
text_end = max(b for a, b, n, perm in maps if n.endswith(binp.split("/")[-1]) and "x" in perm)


def function(ip):
    if not base <= ip < text_end:
        r = region(ip)
        return f"({r.split()[0]})"
    i = bisect.bisect_right(sstarts, ip) - 1
    return syms[i][1][:110] if i >= 0 else hex(ip)


# The worker's park (see above): from an access by PARK's functions up to the next by RUN's.
PARK, RUN = ("Context::park_internal", "transition_worker_to_parked"), "Context::run_task"
kinds = {}


def kind(ip):
    """1 if `ip` starts a park, 2 if it ends one (the worker runs a task), else 0."""
    if ip not in kinds:
        f_ = function(ip)
        kinds[ip] = 2 if RUN in f_ else 1 if any(p in f_ for p in PARK) else 0
    return kinds[ip]


with open(f"{out}/trace", "rb") as f:
    f.seek(start)
    lines = f.read(end - start).split(b"\n")[1:-1]
acc, ip = [], 0
for line in lines:
    if line[:1] == b"I":
        ip = int(line[3:].split(b",")[0], 16)
        continue
    line = line.strip()
    if line[:1] not in (b"L", b"S", b"M"):
        continue
    a, s = line[2:].split(b",")
    a, s = int(a, 16), int(s)
    for ln in range(a >> 6, ((a + s - 1) >> 6) + 1):
        acc.append((ln, line[:1] != b"L", ip))
n = len(acc)
half, reqs = n // 2, nreq / 2
print(f"data accesses per request (64-byte lines): {n / nreq:.0f}")
# The footprint: the distinct lines of each request-long window of the measured part's second
# half, averaged (the windows are not aligned to requests, so each is an estimate; their
# spread is printed), and the regions of the mean.
width = n // nreq
wins = [acc[i:i + width] for i in range(half, n - width + 1, width)]
by, sizes = collections.Counter(), []
for w in wins:
    lns = {ln for ln, _, _ in w}
    sizes.append(len(lns))
    by.update(region(ln << 6) for ln in lns)


def spread(sizes, by):
    """The windows' mean footprint, its spread, and the regions' mean lines."""
    mean = sum(sizes) / len(sizes)
    return (f"{mean:.1f} distinct lines ({mean * 64 / 1024:.1f} KiB; windows "
            f"{min(sizes)}-{max(sizes)}, median {sorted(sizes)[len(sizes) // 2]}): "
            + ", ".join(f"{r} {c / len(sizes):.1f}" for r, c in by.most_common(8)))


print(f"one request's footprint, mean of {len(wins)} request-long windows: {spread(sizes, by)}")
# The footprint without the parks: the accesses outside them, in windows as long as those
# accesses per request.
rest, parked, parks, k0 = [], False, 0, 0
for i, (ln, w, ip) in enumerate(acc):
    k = kind(ip)
    if k == 1 and not parked:
        parked = True
        parks += i >= half
    elif k == 2:
        parked = False
    if not parked:
        rest.append((ln, ip))
        k0 += i < half
print(f"parks in the measured part's second half: {parks / reqs:.2f} per request, "
      f"{(n - half - (len(rest) - k0)) / reqs:.0f} accesses per request "
      f"({PARK[0]} or {PARK[1]} up to the next {RUN})")
rwidth = (len(rest) - k0) * 2 // nreq
rwins = [{ln for ln, _ in rest[i:i + rwidth]} for i in range(k0, len(rest) - rwidth + 1, rwidth)]
rby, rsizes = collections.Counter(), [len(w) for w in rwins]
for w in rwins:
    rby.update(region(ln << 6) for ln in w)
print(f"one request's footprint without the parks, mean of {len(rwins)} windows of {rwidth} "
      f"accesses: {spread(rsizes, rby)}")
# And aligned to the requests: the distinct lines from one request's `Exchange::start` (the
# record each request starts with) to the next request's, without the parks, for each request
# of the second half.
MARK = "Exchange::start"
marks, last = [], -rwidth
for j in range(k0, len(rest)):
    if MARK in function(rest[j][1]):
        # A request's first access there: its callees split its accesses into several runs,
        # all within far less than half a request's accesses.
        if j - last > rwidth // 2:
            marks.append(j)
        last = j
asizes = [len({ln for ln, _ in rest[a:b]}) for a, b in zip(marks, marks[1:])]


def aby_at(ks):
    c = collections.Counter()
    for k in ks:
        c.update(region(ln << 6) for ln in {ln for ln, _ in rest[marks[k]:marks[k + 1]]})
    return c


if not asizes:
    print(f"one request's lines without the parks, from one {MARK} to the next: not printed, "
          f"{MARK} is no symbol of this binary (a PGO + BOLT build) or fewer than two requests were found")
else:
    # The median, and the regions of the requests at it: a few requests hold far more (what
    # else ran in between), and move the mean.
    amean, amed = sum(asizes) / len(asizes), sorted(asizes)[len(asizes) // 2]
    at = [k for k, z in enumerate(asizes) if z == amed]
    print(f"one request's lines without the parks, from one {MARK} to the next, "
          f"{len(asizes)} requests: median {amed} (range {min(asizes)}-{max(asizes)}, mean "
          f"{amean:.1f}, {sum(z > amed + 10 for z in asizes)} above median + 10); the "
          f"{len(at)} at the median: "
          + ", ".join(f"{r} {c / len(at):.1f}" for r, c in aby_at(at).most_common(8)))


def this_machines_l1d():
    """The L1 data cache of the machine the script runs on (CPU 0, from sysfs), as (KiB, ways,
    sets), or None when sysfs does not say or it is the 32 KiB 8-way shape simulated anyway."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            rd = lambda f: open(f"{base}/{idx}/{f}").read().strip()
            if rd("level") == "1" and rd("type") == "Data" and rd("coherency_line_size") == "64":
                kib, ways, sets = int(rd("size").rstrip("K")), int(rd("ways_of_associativity")), int(rd("number_of_sets"))
                return None if (kib, ways, sets) == (32, 8, 64) else (kib, ways, sets)
    except (OSError, ValueError):
        pass
    return None


models = [("32 KiB", "8-way, 64 sets", 8, 64), ("32 KiB", "fully associative", 512, 1)]
here = this_machines_l1d()
if here:
    # The trace is the same whatever the machine; the shape simulated is this machine's too
    # (stops 30-38 ran on a VM with the 32 KiB 8-way one).
    models.append((f"{here[0]} KiB", f"{here[1]}-way, {here[2]} sets (this machine's)", here[1], here[2]))
for size, name, ways, sets in models:
    cache = [collections.OrderedDict() for _ in range(sets)]
    byreg, byfn, byfnw, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for i, (ln, w, ip) in enumerate(acc):
        c = cache[ln % sets]
        if ln in c:
            c.move_to_end(ln)
            continue
        c[ln] = 1
        if len(c) > ways:
            c.popitem(last=False)
        if i >= half:
            total += 1
            r = region(ln << 6)
            byreg[r] += 1
            byfn[(r, function(ip))] += 1
            byfnw[(r, function(ip))] += w
    print(f"== L1D {size} {name}: {total / reqs:.1f} misses per request: "
          + ", ".join(f"{r} {c / reqs:.1f}" for r, c in byreg.most_common(6)))
    for (r, f_), c in byfn.most_common(top):
        print(f"  {c / reqs:6.1f} (writes {byfnw[(r, f_)] / reqs:5.1f})  {r[:14]:14}  {f_}")


def stack_table(title, accesses):
    """The functions touching the most stack lines among `accesses` ((line, ip) pairs)."""
    frames = collections.defaultdict(set)
    for ln, ip in accesses:
        if region(ln << 6) == "stack":
            frames[function(ip)].add(ln)
    print(f"== stack lines touched in {title}, by function")
    for f_, lns in sorted(frames.items(), key=lambda x: -len(x[1]))[:top]:
        print(f"  {len(lns):4d}  {f_}")


stack_table("one request-long window", ((ln, ip) for ln, _, ip in wins[0]))
stack_table("the first window without the parks", rest[k0:k0 + rwidth])

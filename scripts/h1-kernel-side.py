#!/usr/bin/env python3
"""Per-request kernel-side counters of lb, HAProxy and nginx as HTTP/1.1 proxies under
`wrk -t1 -c64` (the configurations of `cargo xtask bench l7`, HTTP listeners only), all inside a
private network namespace (`h1sys-m`, removed on exit) so the TCP counters see only this traffic.
Run as root, inside `flock /tmp/bench.lock`. H1SYS_NS (namespace name), H1SYS_PORT_BASE (backend
port; the proxy listens on the next one) and H1SYS_DIR let two runs coexist. Written for issue 8 (BENCHMARKS.md, "The kernel side").

usage: h1-kernel-side.py [--secs N] [--rounds N] [--perf] [--wake] [--record] [--h2load-log [--sched]] NAME=SPEC ...
  SPEC: lb:/path/to/lb[:ENV=V,ENV=V[:batch|:slice=MICROSECONDS]] | haproxy[:N] | nginx | cmd:COMMAND
        an lb ENV=V item starting with `--` is a flag for `lb run` instead, e.g.
        lb:/path/to/lb:--l7-runtime=shared,--l7-workers=2
        cmd:COMMAND runs COMMAND (split on spaces; {LISTEN} and {BACKEND} replaced by the
        addresses), e.g. 'cmd:scripts/io-floor/target/release/io-floor uring {LISTEN} {BACKEND}'.
        haproxy:N adds N `set-var(...) req.hdrs,sha2(256)` rules: HAProxy with more user time.
  every pass: req/s, p99, user/system CPU µs per request, voluntary/involuntary context
  switches and the namespace's TCP counters (/proc/net/snmp, netstat) per request; `ss -tinem`
  half-way (saved in $H1SYS_DIR, default /tmp/h1sys-run).
  --perf: syscall and scheduler tracepoint counts per request (perf stat -p)
  --wake: the proxy's sched_waking events per request, by wakee, same or other CPU
  --h2load-log: after the wrk pass, one more pass of `h2load --h1 -t1 -c64 -D SECS --log-file`
        (h2load-NAME-rROUND.log) analysed by h1_tail.py: latency distribution, stalls (gaps with
        no completion), bursts of slow requests; wrk stays the client of the main pass
  --sched (with --h2load-log): `perf sched record -k CLOCK_MONOTONIC` of the whole machine
        during that pass; prints what the proxy, client and backend threads did in the stalls
  --record: perf record -g -e cpu-clock of the proxy (perf-NAME.data, requests in perf-NAME.reqs)
  every pass also prints, from /proc/PID/task/*/schedstat, per request: the proxy's time on a
  CPU and waiting on a run queue (runnable, not running), and each thread's share of the run
  time; and wrk's p50 and p99 beside the mean latency by Little's law (64 / req/s).
  H1SYS_STRACE=1: 0.3 s of strace of the data syscalls (strace-NAME.txt)
"""
import collections, ctypes, os, struct, re, shutil, signal, subprocess, sys, threading, time

NS = os.environ.get("H1SYS_NS", "h1sys-m")
D = os.environ.get("H1SYS_DIR", "/tmp/h1sys-run")
BODY = "lb-bench-response-body-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz-01"
_BASE = int(os.environ.get("H1SYS_PORT_BASE", "18080"))
BACKEND = f"127.0.0.1:{_BASE}"
PORT = _BASE + 1


libc = ctypes.CDLL(None, use_errno=True)
SYS_sched_setattr, SYS_sched_getattr = 314, 315  # x86_64


def set_slice(tid, ns):
    """EEVDF slice request (sched_attr.sched_runtime for SCHED_OTHER, Linux 6.12+)."""
    attr = struct.pack("IIQiIQQQII", 56, 0, 0, 0, 0, ns, 0, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, 56)
    r = libc.syscall(SYS_sched_setattr, tid, buf, 0)
    if r != 0:
        raise OSError(ctypes.get_errno(), f"sched_setattr {tid}")


def get_slice(tid):
    buf = ctypes.create_string_buffer(56)
    r = libc.syscall(SYS_sched_getattr, tid, buf, 56, 0)
    if r != 0:
        raise OSError(ctypes.get_errno(), "sched_getattr")
    return struct.unpack("IIQiIQQQII", buf.raw)[5]


def sh(*a, **kw):
    return subprocess.run(list(a), check=True, **kw)


def nsx(*a):
    return ["ip", "netns", "exec", NS, *a]


def snmp():
    out = {}
    for f in ("/proc/net/snmp", "/proc/net/netstat"):
        txt = subprocess.run(nsx("cat", f), capture_output=True, text=True).stdout.splitlines()
        for h, v in zip(txt[0::2], txt[1::2]):
            hs, vs = h.split(), v.split()
            for k, x in zip(hs[1:], vs[1:]):
                out[hs[0].rstrip(":") + k] = int(x)
    return out


def pids_of(root):
    pids = [root]
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = open(f"/proc/{e}/stat").read()
                if int(st.rsplit(")", 1)[1].split()[1]) == root:
                    pids.append(int(e))
            except Exception:
                pass
    return pids


def cpu(pids):
    hz = os.sysconf("SC_CLK_TCK")
    u = s = 0.0
    for p in pids:
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        u += int(f[11]) / hz
        s += int(f[12]) / hz
    return u, s


def ctxsw(pids):
    v = n = 0
    for p in pids:
        for t in os.listdir(f"/proc/{p}/task"):
            try:
                for line in open(f"/proc/{p}/task/{t}/status"):
                    if line.startswith("voluntary_ctxt_switches"):
                        v += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        n += int(line.split()[1])
            except FileNotFoundError:
                pass
    return v, n


def schedstat(pids):
    """Per thread: (comm, ns on a CPU, ns runnable on a run queue, timeslices)."""
    out = {}
    for p in pids:
        for t in os.listdir(f"/proc/{p}/task"):
            try:
                run, wait, slices = map(int, open(f"/proc/{p}/task/{t}/schedstat").read().split())
                comm = open(f"/proc/{p}/task/{t}/comm").read().strip()
                out[int(t)] = (comm, run, wait, slices)
            except (FileNotFoundError, ValueError):
                pass
    return out


def sched_line(before, after, n):
    """The proxy's run and run-queue time per request, and how its run time splits over its
    busy threads (the ones with at least 1 % of it)."""
    d = {t: (a[1] - before[t][1], a[2] - before[t][2]) for t, a in after.items() if t in before}
    run = sum(r for r, _ in d.values())
    wait = sum(w for _, w in d.values())
    split = sorted((r / run for r, _ in d.values() if run and r / run >= 0.01), reverse=True)
    return (f"   sched per req: on cpu {run / 1e3 / n:5.1f} us, waiting runnable {wait / 1e3 / n:5.1f} us;"
            f" run-time split over threads {' / '.join(f'{x:.2f}' for x in split)}")


def start_backend():
    conf = f"{D}/backend.conf"
    open(conf, "w").write(
        f"worker_processes 1;\ndaemon off;\npid {D}/backend.pid;\nerror_log {D}/backend-error.log;\n"
        "events { worker_connections 8192; }\n"
        "http {\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n"
        f"  server {{\n    listen {BACKEND} backlog=4096;\n    default_type text/plain;\n"
        f'    location / {{ return 200 "{BODY}"; }}\n  }}\n}}\n')
    return subprocess.Popen(nsx("nginx", "-c", conf, "-p", D), stdout=open(f"{D}/backend.log", "w"), stderr=subprocess.STDOUT)


def start_proxy(spec):
    kind, *rest = spec.split(":")
    env = dict(os.environ)
    if kind == "lb":
        lb = rest[0]
        flags = []
        if len(rest) > 1 and rest[1]:
            for kv in rest[1].split(","):
                if kv.startswith("--"):
                    flags.append(kv)
                    continue
                k, v = kv.split("=", 1)
                env[k] = v
        args = [lb, "run", "--listener", f"web=http://127.0.0.1:{PORT}", "--target-group", "be,health-check=off",
                "--target", f"be={BACKEND}", "--rule", "web,default,forward=be", "--admin-socket", f"{D}/admin.sock",
                *flags]
        if len(rest) > 2 and rest[2].startswith("slice="):
            env["H1SYS_SLICE"] = rest[2][6:]
        if len(rest) > 2 and rest[2] == "batch":
            args = ["chrt", "-b", "0"] + args
    elif kind == "cmd":
        args = [a.replace("{LISTEN}", f"127.0.0.1:{PORT}").replace("{BACKEND}", BACKEND)
                for a in ":".join(rest).split()]
    elif kind == "haproxy":
        conf = f"{D}/haproxy.cfg"
        burn = int(rest[0]) if rest else 0
        extra = "".join(f"  http-request set-var(txn.b{i}) req.hdrs,sha2(256),hex\n" for i in range(burn))
        open(conf, "w").write(
            "global\n  maxconn 8000\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n"
            f"frontend fe_http\n  bind 127.0.0.1:{PORT}\n{extra}  default_backend be\n"
            f"backend be\n  server s1 {BACKEND}\n")
        args = ["haproxy", "-db", "-f", conf]
    else:
        conf = f"{D}/nginx-proxy.conf"
        open(conf, "w").write(
            f"worker_processes auto;\ndaemon off;\npid {D}/proxy.pid;\nerror_log {D}/proxy-error.log;\n"
            "events { worker_connections 16384; }\n"
            "http {\n  access_log off;\n  keepalive_requests 100000000;\n"
            f"  upstream be {{ server {BACKEND}; keepalive 256; }}\n"
            f"  server {{\n    listen 127.0.0.1:{PORT} backlog=4096;\n"
            '    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }\n  }\n}\n')
        args = ["nginx", "-c", conf, "-p", D]
    p = subprocess.Popen(nsx(*args), stdout=open(f"{D}/proxy.log", "w"), stderr=subprocess.STDOUT, env=env)
    for _ in range(200):
        r = subprocess.run(nsx("bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{PORT}"), capture_output=True)
        if r.returncode == 0:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    if env.get("H1SYS_SLICE"):
        for t in os.listdir(f"/proc/{p.pid}/task"):
            set_slice(int(t), int(env["H1SYS_SLICE"]) * 1000)
    # ip netns exec execs, so p.pid is the proxy itself
    return p


def wrk(secs, conns=64):
    out = subprocess.run(nsx("wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", f"http://127.0.0.1:{PORT}/"),
                         capture_output=True, text=True).stdout
    m = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    return int(m.group(1)), (p99.group(1) if p99 else "?"), out


def ss_snapshot(tag):
    return subprocess.run(nsx("ss", "-tinemHO", "state", "established"), capture_output=True, text=True).stdout


KEYS = ["TcpInSegs", "TcpOutSegs", "TcpExtDelayedACKs", "TcpExtTCPPureAcks", "TcpExtTCPHPAcks", "TcpExtTCPHPHits",
        "TcpExtTCPAutoCorking", "TcpExtTCPOrigDataSent", "TcpExtTCPBacklogCoalesce", "TcpExtTCPDelivered",
        "TcpExtTCPRcvCoalesce", "TcpExtTCPOFOQueue", "TcpExtDelayedACKLost", "TcpExtTCPDSACKOldSent",
        "TcpExtTCPFromZeroWindowAdv", "TcpExtTCPToZeroWindowAdv", "TcpExtTCPWantZeroWindowAdv", "TcpExtTCPACKSkippedSeq",
        "TcpExtTCPKeepAlive", "TcpExtTCPSackRecovery", "TcpRetransSegs"]


def h2load_pass(name, rnd, secs, pids, psched):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import h1_tail
    log = f"{D}/h2load-{name}-r{rnd}.log"
    tids = [int(t) for p_ in pids for t in os.listdir(f"/proc/{p_}/task")]
    pp = None
    if psched:
        sd = f"{D}/sched-{name}-r{rnd}.data"
        pp = subprocess.Popen(["perf", "sched", "record", "-k", "CLOCK_MONOTONIC", "-o", sd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
    out = subprocess.run(nsx("h2load", "--h1", "-t1", "-c64", "-D", str(secs), f"--log-file={log}",
                             f"http://127.0.0.1:{PORT}/"), capture_output=True, text=True).stdout
    offset = (offset + time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)) / 2
    open(f"{D}/h2load-{name}-r{rnd}.txt", "w").write(out)
    th = None
    if pp:
        pp.send_signal(signal.SIGINT)
        pp.wait()
        th = f"{D}/sched-{name}-r{rnd}.txt"
        with open(th, "w") as f:
            subprocess.run(["perf", "sched", "timehist", "-i", sd], stdout=f, stderr=subprocess.DEVNULL)
        os.unlink(sd)
    # to run the analysis again: h1_tail.py LOG TIMEHIST OFFSET TIDS
    open(f"{D}/h2load-{name}-r{rnd}.meta", "w").write(f"{log} {th} {offset:.6f} {','.join(map(str, tids))}\n")
    h1_tail.report(log, th, offset, tids, name)


def main():
    argv = sys.argv[1:]
    secs, perf, record, rounds, wake, h2log, psched = 10, False, False, 1, False, False, False
    while argv and argv[0].startswith("--"):
        a = argv.pop(0)
        if a == "--secs":
            secs = int(argv.pop(0))
        elif a == "--perf":
            perf = True
        elif a == "--wake":
            wake = True
        elif a == "--record":
            record = True
        elif a == "--h2load-log":
            h2log = True
        elif a == "--sched":
            psched = True
        elif a == "--rounds":
            rounds = int(argv.pop(0))
    specs = [a.split("=", 1) for a in argv]
    shutil.rmtree(D, ignore_errors=True)
    os.makedirs(D)
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    backend = None
    try:
        backend = start_backend()
        time.sleep(0.5)
        for rnd in range(rounds):
            for name, spec in specs:
                p = start_proxy(spec)
                try:
                    pids = pids_of(p.pid)
                    wrk(1, 8)
                    c0, x0, s0, q0 = cpu(pids), ctxsw(pids), snmp(), schedstat(pids)
                    t0 = time.time()
                    res = {}
                    th = threading.Thread(target=lambda: res.update(r=wrk(secs)))
                    th.start()
                    time.sleep(secs / 2)
                    ssout = ss_snapshot(name)
                    th.join()
                    c1, x1, s1, q1 = cpu(pids), ctxsw(pids), snmp(), schedstat(pids)
                    n, p99, out = res["r"]
                    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
                    line = f"{name:10} r{rnd} req {n:8d} ({n/secs/1000:.1f}k/s) p99 {p99:>8}  usr {1e6*(c1[0]-c0[0])/n:5.1f} sys {1e6*(c1[1]-c0[1])/n:5.1f} us/req  vcsw {(x1[0]-x0[0])/n:.3f} ivcsw {(x1[1]-x0[1])/n:.3f}/req"
                    print(line)
                    print(f"   latency: p50 {p50.group(1) if p50 else '?'}  p99 {p99}  mean by Little's law {64 * secs / n * 1e3:.2f}ms")
                    print(sched_line(q0, q1, n))
                    print("   per req: " + "  ".join(f"{k.replace('TcpExt','').replace('Tcp','')}={(s1.get(k,0)-s0.get(k,0))/n:.3f}" for k in KEYS if s1.get(k, 0) != s0.get(k, 0)))
                    open(f"{D}/ss-{name}-r{rnd}.txt", "w").write(ssout)
                    if h2log:
                        h2load_pass(name, rnd, secs, pids, psched)
                    if perf:
                        pl = ",".join(map(str, pids))
                        ev = "raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_readv,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_sendmsg,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_futex,syscalls:sys_enter_io_uring_enter,sched:sched_wakeup,sched:sched_switch,net:net_dev_xmit,syscalls:sys_exit_recvfrom"
                        pp = subprocess.Popen(["perf", "stat", "-x,", "-e", ev, "-p", pl], stderr=subprocess.PIPE, text=True)
                        time.sleep(0.5)
                        n5, _, _ = wrk(5)
                        pp.send_signal(signal.SIGINT)
                        _, err = pp.communicate()
                        rate = n5
                        pr = type("R", (), {"stderr": err})
                        vals = []
                        for l in pr.stderr.splitlines():
                            f = l.split(",")
                            if len(f) > 3 and f[0].replace(".", "").isdigit():
                                vals.append(f"{f[2].split(':')[-1]}={int(float(f[0]))/rate:.3f}")
                        print("   perf per req: " + "  ".join(vals))
                    if os.environ.get("H1SYS_STRACE"):
                        th = threading.Thread(target=lambda: res.update(r=wrk(3)))
                        th.start()
                        time.sleep(1)
                        tids = []
                        for p_ in pids:
                            tids += os.listdir(f"/proc/{p_}/task")
                        args = ["timeout", "-s", "INT", "0.3", "strace", "-qq", "-e", "trace=recvfrom,read,sendto,writev,write,epoll_wait", "-o", f"{D}/strace-{name}.txt"]
                        for t in tids:
                            args += ["-p", t]
                        subprocess.run(args, capture_output=True)
                        th.join()
                    if wake:
                        pl = ",".join(map(str, pids))
                        pp = subprocess.Popen(["perf", "record", "-q", "-e", "sched:sched_waking", "-p", pl, "-o", f"{D}/wake-{name}.data"], stderr=subprocess.PIPE, text=True)
                        time.sleep(0.5)
                        n5, _, _ = wrk(4)
                        pp.send_signal(signal.SIGINT)
                        pp.communicate()
                        sc = subprocess.run(["perf", "script", "-i", f"{D}/wake-{name}.data", "-F", "comm,tid,cpu,trace"], capture_output=True, text=True).stdout
                        c = collections.Counter()
                        own = set()
                        for p_ in pids:
                            own.update(int(t) for t in os.listdir(f"/proc/{p_}/task"))
                        for l in sc.splitlines():
                            m = re.search(r"\[(\d+)\].*comm=(\S+) pid=(\d+) prio=\d+ target_cpu=(\d+)", l)
                            if not m:
                                continue
                            cpu_, wcomm, wpid, tcpu = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
                            who = "self" if wpid in own else wcomm
                            c[(who, "cross" if cpu_ != tcpu else "same")] += 1
                        print(f"   wakings per req ({name}): " + "  ".join(f"{k[0]}/{k[1]}={v/n5:.3f}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])[:8]))
                    if record:
                        pl = ",".join(map(str, pids))
                        th = threading.Thread(target=lambda: res.update(r=wrk(6)))
                        th.start()
                        time.sleep(1)
                        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-g", "-p", pl, "-o", f"{D}/perf-{name}.data", "--", "sleep", "4"], capture_output=True)
                        th.join()
                        n6, _, _ = res["r"]
                        open(f"{D}/perf-{name}.reqs", "w").write(str(n6 / 6 * 4))
                finally:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                    time.sleep(0.3)
    finally:
        if backend:
            backend.send_signal(signal.SIGTERM)
            try:
                backend.wait(5)
            except subprocess.TimeoutExpired:
                backend.kill()
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


main()

#!/usr/bin/env python3
"""Counts the BPF instructions `lb_xdp` executes on a flow-table hit, IPv4 and IPv6, without
loading anything: steps the compiled object (the relocatable ELF that aya-build writes, e.g.
target/release/build/lb-userspace-*/out/aya-build/target/lb-ebpf/bpfel-unknown-none/release/lb-ebpf)
through one TCP frame to a DSR VIP whose flow, backend and next hop are all known (stub maps:
every lookup finds the entry the hit needs). Load-independent, unlike the XDP benchmark's
nanoseconds, so it A/Bs a change to the hit path exactly.

    python3 scripts/xdp-path-count.py OBJ [OBJ...]         # instructions, helpers, lookups
    python3 scripts/xdp-path-count.py --lines v6 OBJ [N]    # the N source lines executing most
    python3 scripts/xdp-path-count.py --frames BASE OBJ...  # same action and output frame as BASE?
    python3 scripts/xdp-path-count.py --paths OBJ...        # the hit, a new flow, a SYN, not a VIP

What it counts: BPF instructions as compiled (an ld_imm64 counts once), before the verifier's
rewrites (which inline array-map lookups and `bpf_jiffies64`, and JIT to x86). Helper calls
(map lookups included) are listed apart: their cost is the kernel's. Written for stop 22's
IPv6 hit work (BENCHMARKS.md, "XDP IPv6 hit (stop 22)"). The map value layouts below mirror
lb-common's `repr(C)` structs: update them with a layout change.
"""
import struct, sys

def u(x): return x & 0xffffffffffffffff
def s64(x):
    x = u(x); return x - (1 << 64) if x >> 63 else x
def s32(x):
    x &= 0xffffffff; return x - (1 << 32) if x >> 31 else x

class Elf:
    def __init__(s, path):
        d = open(path, 'rb').read(); s.d = d
        shoff, = struct.unpack_from('<Q', d, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from('<HHH', d, 0x3a)
        s.sh = []
        for i in range(shnum):
            name, typ, flags, addr, off, size, link, info, align, entsize = struct.unpack_from('<IIQQQQIIQQ', d, shoff + i * shentsize)
            s.sh.append(dict(name=name, type=typ, off=off, size=size, link=link, info=info))
        strtab = s.sh[shstrndx]
        for h in s.sh:
            h['n'] = s.cstr(strtab['off'] + h['name'])
        symtab = [h for h in s.sh if h['type'] == 2][0]
        ss = s.sh[symtab['link']]
        s.syms = []
        for i in range(symtab['size'] // 24):
            name, info, other, shndx, value, size = struct.unpack_from('<IBBHQQ', d, symtab['off'] + 24 * i)
            s.syms.append(dict(n=s.cstr(ss['off'] + name), shndx=shndx, value=value, size=size, type=info & 15))
        s.rel = {}  # section index -> {insn offset: sym}
        for h in s.sh:
            if h['type'] == 9:
                r = s.rel.setdefault(h['info'], {})
                for i in range(h['size'] // 16):
                    off, info = struct.unpack_from('<QQ', d, h['off'] + 16 * i)
                    r[off] = s.syms[info >> 32]
    def cstr(s, o):
        e = s.d.index(b'\0', o); return s.d[o:e].decode()
    def sec(s, name):
        for i, h in enumerate(s.sh):
            if h['n'] == name: return i, s.d[h['off']:h['off'] + h['size']]
        raise KeyError(name)

class Mem:
    def __init__(s): s.regions = []
    def add(s, base, buf, name): s.regions.append((base, buf, name)); return base
    def find(s, a, n):
        for base, buf, name in s.regions:
            if base <= a and a + n <= base + len(buf): return buf, a - base
        raise Exception('bad access %x+%d' % (a, n))
    def ld(s, a, n):
        b, o = s.find(a, n); return int.from_bytes(b[o:o + n], 'little')
    def st(s, a, n, v):
        b, o = s.find(a, n); b[o:o + n] = (v & ((1 << (8 * n)) - 1)).to_bytes(n, 'little')

SZ = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}

def run(elf, entry_sec, entry_idx, mem, r1, maps, helpers, trace=None):
    secidx, code = elf.sec(entry_sec)
    codes = {}
    def getcode(si):
        if si not in codes:
            h = elf.sh[si]; codes[si] = elf.d[h['off']:h['off'] + h['size']]
        return codes[si]
    R = [0] * 11
    stack_top = 0x10000000 + 512 * 8
    mem.add(0x10000000, bytearray(512 * 8), 'stack')
    R[1] = r1; R[10] = stack_top
    frames = []
    si, pc = secidx, entry_idx
    n = 0; calls = {}
    while True:
        c = getcode(si)
        op, regs, off, imm = struct.unpack_from('<BBhi', c, pc * 8)
        dst, src = regs & 15, regs >> 4
        n += 1
        if trace is not None: trace.append((si, pc))
        cls = op & 7
        npc = pc + 1
        if cls in (4, 7):
            a64 = cls == 7
            code_ = op & 0xf0
            if code_ == 0xb0 and op & 8 and not isinstance(R[src], int):
                R[dst] = R[src]; pc = npc; continue
            val = R[src] if op & 8 else (imm if a64 else imm & 0xffffffff)
            if a64:
                a = u(R[dst]); b = u(val if op & 8 else s64(imm))
            else:
                a = R[dst] & 0xffffffff; b = val & 0xffffffff
            m = (1 << 64) - 1 if a64 else 0xffffffff
            bits = 64 if a64 else 32
            if code_ == 0x00: r = a + b
            elif code_ == 0x10: r = a - b
            elif code_ == 0x20: r = a * b
            elif code_ == 0x30: r = a // b if b else 0
            elif code_ == 0x40: r = a | b
            elif code_ == 0x50: r = a & b
            elif code_ == 0x60: r = a << (b & (bits - 1))
            elif code_ == 0x70: r = (a & m) >> (b & (bits - 1))
            elif code_ == 0x80: r = -a
            elif code_ == 0x90: r = a % b if b else a
            elif code_ == 0xa0: r = a ^ b
            elif code_ == 0xb0:
                if off: # movsx
                    r = b & ((1 << off) - 1)
                    if r >> (off - 1): r -= 1 << off
                else: r = b
            elif code_ == 0xc0:
                sa = (a & m); sa = sa - (1 << bits) if sa >> (bits - 1) else sa
                r = sa >> (b & (bits - 1))
            elif code_ == 0xd0:
                w = imm
                x = R[dst] & ((1 << w) - 1)
                if (op & 8) or a64: x = int.from_bytes(x.to_bytes(w // 8, 'little'), 'big')
                R[dst] = x; pc = npc; continue
            else: raise Exception('alu %x' % op)
            R[dst] = r & m
        elif cls == 0:
            if op == 0x18:
                op2, _, _, imm2 = struct.unpack_from('<BBhi', c, pc * 8 + 8)
                v = (imm & 0xffffffff) | (imm2 & 0xffffffff) << 32
                rel = elf.rel.get(si, {}).get(pc * 8)
                if rel:
                    sh = elf.sh[rel['shndx']]['n']
                    if sh == '.maps': v = ('map', rel['n'])
                    else: v = maps['__data'](sh) + rel['value'] + v
                R[dst] = v; npc = pc + 2
            else: raise Exception('ld %x' % op)
        elif cls == 1:
            sz = SZ[op & 0x18]; mode = op & 0xe0
            v = mem.ld(u(R[src] + off), sz)
            if mode == 0x80:
                if v >> (8 * sz - 1): v -= 1 << (8 * sz)
                v = u(v)
            R[dst] = v
        elif cls in (2, 3):
            sz = SZ[op & 0x18]; mode = op & 0xe0
            a = u(R[dst] + off)
            if mode == 0xc0:
                if imm not in (0, 1): raise Exception('atomic %d' % imm)
                old = mem.ld(a, sz); mem.st(a, sz, old + R[src])
                if imm == 1: R[src] = old
            else:
                mem.st(a, sz, R[src] if cls == 3 else u(s64(imm)))
        elif cls in (5, 6):
            code_ = op & 0xf0
            if code_ == 0x90:
                if not frames: return R[0], n, calls
                si, pc, saved = frames.pop(); R[6:10] = saved; R[10] += 512; continue
            if code_ == 0x80:
                if src == 1:
                    rel = elf.rel.get(si, {}).get(pc * 8)
                    frames.append((si, npc, R[6:10]))
                    R[10] -= 512
                    if rel:
                        si = rel['shndx']; pc = rel['value'] // 8 + imm + 1
                    else:
                        pc = pc + imm + 1
                    continue
                calls[imm] = calls.get(imm, 0) + 1
                R[0] = helpers(imm, R, mem)
                for r in range(1, 6): R[r] = 0xdead
                pc = npc; continue
            if code_ == 0x00:
                pc = pc + (imm if cls == 6 else off) + 1; continue
            m = (1 << 64) - 1 if cls == 5 else 0xffffffff
            bits = 64 if cls == 5 else 32
            a = R[dst] & m if isinstance(R[dst], int) else R[dst]
            b = (R[src] if op & 8 else u(s64(imm))) & m
            def sg(x): return x - (1 << bits) if x >> (bits - 1) else x
            t = {0x10: lambda: a == b, 0x20: lambda: a > b, 0x30: lambda: a >= b, 0x40: lambda: a & b != 0,
                 0x50: lambda: a != b, 0x60: lambda: sg(a) > sg(b), 0x70: lambda: sg(a) >= sg(b),
                 0xa0: lambda: a < b, 0xb0: lambda: a <= b, 0xc0: lambda: sg(a) < sg(b), 0xd0: lambda: sg(a) <= sg(b)}[code_]()
            if t: npc = pc + off + 1
        pc = npc

# ---- driver: lb_xdp on one hit frame ----
def ip6(s): 
    import ipaddress; return ipaddress.IPv6Address(s).packed
def ip4(s):
    import ipaddress; return ipaddress.IPv4Address(s).packed
def words(b): return list(struct.unpack('<4I', b))  # header-order words read natively

TICK = 4000000; J = 1000000; NOW = J * TICK; IF = 7

def lb_maps(v6=True, nat=False):
    backend = (ip6('fd00::13') if v6 else ip4('10.0.0.13') + b'\0' * 12)
    fam = 6 if v6 else 4
    vals = {
        'LB_VIPS': struct.pack('<IIQQQ', 1, 8 if nat else 0, 300 * 10**9, 0, 0),
        'LB_CONFIG': struct.pack('<IIIII16sIQQQ', 0, 0, 65537, 0, struct.unpack('<I', ip4('10.0.0.2'))[0], ip6('fd00::2'), 5, TICK, 0, 10**9),
        'LB_FLOWS': struct.pack('<IIQQ', 3, 1, NOW, NOW),
        'LB_BACKENDS': struct.pack('<16sHBBII', backend, 0, 1, fam, 1, 1),
        'LB_NEXTHOPS': struct.pack('<16sIIIHBB6s6s4sQ', backend, 5, IF, IF, 1500, fam, 0, b'\x02' * 6, b'\x04' * 6, b'', NOW),
    }
    return vals

def frame(v6=True, flags=0x10):
    eth = b'\x02' * 6 + b'\x04' * 6 + (b'\x86\xdd' if v6 else b'\x08\x00')
    tcp = struct.pack('>HHIIBBHHH', 40000, 80, 1, 1, 0x50, flags, 65535, 0, 0)
    if v6:
        ip = struct.pack('>IHBB', 0x60000000, len(tcp), 6, 64) + ip6('2001:db8:1::5') + ip6('2001:db8:100::1')
    else:
        ip = struct.pack('>BBHHHBBH', 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0) + ip4('192.0.2.5') + ip4('10.100.0.1')
    return eth + ip + tcp

# The paths `--paths` counts besides the hit: (TCP flags, lookups that find nothing, XDP action).
# `new flow`: an ACK whose flow table has no entry (ring, then the insert); `SYN`: an opening
# SYN (ring, then the NOEXIST insert, which succeeds); `not a VIP`: no VIP at the address:port
# nor at port 0, no NAT reverse entry (host traffic: passed).
PATHS = {
    'hit': (0x10, (), 3),
    'new flow': (0x10, ('LB_FLOWS',), 3),
    'SYN': (0x02, (), 3),
    'not a VIP': (0x10, ('LB_VIPS', 'LB_NAT_REVERSE'), 2),
}

def lb_run(path, v6=True, verbose=False, scenario='hit'):
    flags, absent, _ = PATHS[scenario]
    elf = Elf(path)
    mem = Mem()
    vals = lb_maps(v6)
    bufs = {}
    base = [0x40000000]
    lookups = {}
    def mapval(name):
        if name not in bufs:
            v = vals.get(name, b'')
            b = bytearray(max(256, len(v))); b[:len(v)] = v
            bufs[name] = mem.add(base[0], b, name); base[0] += 0x10000
        return bufs[name]
    _, rodata = elf.sec('.rodata')
    ro = mem.add(0x50000000, bytearray(rodata), '.rodata')
    maps = {'__data': lambda sh: ro}
    pkt = bytearray(256 + 2048)
    f = frame(v6, flags); pkt[256:256 + len(f)] = f
    PB = 0x20000000
    mem.add(PB, pkt, 'packet')
    ctx = bytearray(24)
    struct.pack_into('<IIIIII', ctx, 0, PB + 256, PB + 256 + len(f), PB + 256, IF, 0, 0)
    CB = 0x30000000
    mem.add(CB, ctx, 'ctx')
    def helpers(h, R, mem):
        if h == 1:
            name = R[1][1]; lookups[name] = lookups.get(name, 0) + 1
            return 0 if name in absent else mapval(name)
        if h in (2, 3):  # map update / delete: succeed
            name = R[1][1]; lookups[name + (' update' if h == 2 else ' delete')] = 1
            return 0
        if h == 118: return J
        if h == 44:
            d = struct.unpack_from('<I', ctx, 0)[0] + s32(R[2]); struct.pack_into('<I', ctx, 0, d); return 0
        if h == 23: return 4
        raise Exception('helper %d' % h)
    # entry: lb_xdp in section xdp
    xi, _ = elf.sec('xdp')
    sym = [s for s in elf.syms if s['n'] == 'lb_xdp'][0]
    rc, n, calls = run(elf, 'xdp', sym['value'] // 8, mem, CB, maps, helpers)
    d = struct.unpack_from('<I', ctx, 0)[0]
    out = bytes(mem.find(d, 14 + 40)[0][d - PB:d - PB + 14 + 40 + 40])
    return rc, n, calls, lookups, out


def profile(path, v6):
    import subprocess, re, collections
    out = subprocess.run(['/usr/lib/llvm-22/bin/llvm-objdump', '-d', '-l', '--no-show-raw-insn', path], capture_output=True, text=True).stdout
    sec = None; line = '?'; where = {}
    for l in out.splitlines():
        m = re.match(r'Disassembly of section (\S+):', l)
        if m: sec = m.group(1); continue
        m = re.match(r'^; (/\S+:\d+)', l)
        if m: line = m.group(1).split('/src/')[-1]; continue
        m = re.match(r'^\s+(\d+):\t', l)
        if m: where[(sec, int(m.group(1)))] = line
    return where


def lines(path, v6, top):
    import collections
    w = profile(path, v6)
    elf = Elf(path)
    names = {i: h['n'] for i, h in enumerate(elf.sh)}
    tr = []
    global run
    orig = run
    def traced(*a, **k):
        k['trace'] = tr
        return orig(*a, **k)
    run = traced
    try:
        lb_run(path, v6)
    finally:
        run = orig
    c = collections.Counter(w.get((names[si], pc), '?') for si, pc in tr)
    for k, v in c.most_common(top):
        print('%5d  %s' % (v, k))


if __name__ == '__main__':
    a = sys.argv[1:]
    if a and a[0] == '--lines':
        lines(a[2], a[1] == 'v6', int(a[3]) if len(a) > 3 else 30)
        sys.exit(0)
    if a and a[0] == '--paths':
        # Every path of PATHS, both families: instructions and the action.
        for path in a[1:]:
            for sc, (_, _, want) in PATHS.items():
                for v6 in (False, True):
                    rc, n, calls, lookups, out = lb_run(path, v6, scenario=sc)
                    assert rc == want, '%s: expected action %d, got %d' % (sc, want, rc)
                    print('%s %s IPv%d: %d BPF instructions, helper calls %s' % (
                        path, sc, 6 if v6 else 4, n, calls))
        sys.exit(0)
    if a and a[0] == '--frames':
        # The action and the first 94 bytes written (Ethernet + outer IPv6 + 40 inner) of each
        # object's hit, against BASE's (stop 23: every cut must leave them byte-identical).
        bad = 0
        for path in a[2:]:
            for v6 in (False, True):
                want, got = lb_run(a[1], v6), lb_run(path, v6)
                same = want[0] == got[0] and want[4] == got[4]
                bad += not same
                print('%s hit %s: %s' % (path, 'IPv6' if v6 else 'IPv4',
                                         'same action and frame' if same else 'DIFFERS'))
        sys.exit(1 if bad else 0)
    for path in a:
        for v6 in (False, True):
            rc, n, calls, lookups, out = lb_run(path, v6)
            assert rc == 3, 'expected XDP_TX, got %d' % rc
            print('%s hit %s: %d BPF instructions, helper calls %s (lookups %s)' % (
                path, 'IPv6' if v6 else 'IPv4', n, calls, lookups))

"""Reads valgrind callgrind output files, for the scripts/callgrind-*.py tools.

The format (valgrind's "Callgrind Format Specification"): names compressed as "(id) name" on
first use and "(id)" after; cost lines start with the positions ("line", or "instr line" with
--dump-instr=yes), each absolute or relative to the line before (+N, -N, * for the same);
a cost line right after "calls=" is the inclusive cost of that call, not the caller's own."""
import re


def cost_lines(path):
    """Yields (fn, cfn, positions, costs, events) for every cost line of the file at `path`.
    fn: the function the line belongs to; cfn: the called function when the line is a call's
    inclusive cost, else None (the line is fn's own, self cost); positions: absolute, one int
    per "positions:" entry (an instruction address first with --dump-instr=yes); costs: one
    int per event, missing trailing ones 0; events: the event names (Ir, I1mr, Bim, ...)."""
    names = {}

    def name(rest):
        m = re.match(r"\((\d+)\)(?: (.*))?", rest)
        if not m:
            return rest
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), rest)

    events, last = [], [0]
    fn = cfn = None
    call = False
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("positions:"):
            last = [0] * (len(line.split()) - 1)
        elif line.startswith("fn="):
            fn, call = name(line[3:]), False
        elif line.startswith("cfn="):
            cfn = name(line[4:])
        elif line.startswith("calls="):
            call = True
        elif line and (line[0].isdigit() or line[0] in "+-*"):
            p = line.split()
            for i, t in enumerate(p[: len(last)]):
                if t != "*":
                    last[i] = last[i] + int(t, 0) if t[0] in "+-" else int(t, 0)
            costs = [int(x) for x in p[len(last):]]
            costs += [0] * (len(events) - len(costs))
            yield fn, (cfn if call else None), list(last), costs, events
            call = False


def self_costs(path):
    """(events, {function: [self cost per event]}) of the file at `path`."""
    events, cost = [], {}
    for fn, cfn, _, costs, events in cost_lines(path):
        if cfn is not None or fn is None:
            continue
        if fn in cost:
            cost[fn] = [a + b for a, b in zip(cost[fn], costs)]
        else:
            cost[fn] = costs
    return events, cost

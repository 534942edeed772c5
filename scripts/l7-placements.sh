#!/bin/bash
# usage: scripts/l7-placements.sh BIN MODE N OUT "P1 P2 ..."   (MODE: h1, h2, … as
#   scripts/l7-instructions.sh takes; FOOTPRINT=1: scripts/l7-footprint.sh instead, HTTP/1.1 only)
# Measures one lb build at several placements (LB_PLACEMENT, lb's bench-only knob: where the
# worker's stack and the small heap blocks land, not the work done; see
# lb::proxy::server::parse_placement), to tell a change's D1-miss difference from the spread
# that where lines land in the cache's 64 sets causes on its own.
# Per placement P: scripts/l7-instructions.sh BIN MODE N OUT/pP with CALLGRIND_OPTS=--cache-sim=yes
# and LB_PLACEMENT=P in lb's environment; prints Ir, D1mr + D1mw (D1 misses) and D1mr, D1mw per
# request (callgrind-diff.py's totals), then the median, min and max of Ir and D1 misses.
# FOOTPRINT=1: scripts/l7-footprint.sh BIN N OUT/pP, then footprint.py over 30-request windows;
# prints the distinct lines and the 8-way and fully associative misses per request it reports.
# Each run takes /tmp/bench.lock itself (flock), so other benches interleave between placements;
# PORT_BASE as the scripts it runs.
set -u
BIN=$1; MODE=$2; N=$3; OUT=$4; PLACEMENTS=$5
HERE=$(dirname "$0")
mkdir -p "$OUT"
stats() { # stats NAME VALUES…: median, min and max
  local name=$1; shift
  printf '%s\n' "$@" | sort -g | awk -v name="$name" '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%-14s median %9.1f  min %9.1f  max %9.1f  spread %7.1f\n", name, m, v[1], v[NR], v[NR] - v[1] }'
}
IRS=(); MISSES=()
for P in $PLACEMENTS; do
  if [ "${FOOTPRINT:-0}" = 1 ]; then
    LB_PLACEMENT=$P flock /tmp/bench.lock "$HERE/l7-footprint.sh" "$BIN" "$N" "$OUT/p$P" > "$OUT/p$P.log" 2>&1 \
      || { echo "placement $P failed:"; tail -5 "$OUT/p$P.log"; exit 1; }
    python3 "$HERE/footprint.py" "$OUT/p$P" "$BIN" "$N" 30 > "$OUT/p$P.txt" 2>&1 \
      || { echo "footprint.py failed for placement $P:"; tail -5 "$OUT/p$P.txt"; exit 1; }
    rm -f "$OUT/p$P"/*trace* 2>/dev/null
    echo "placement $P: $OUT/p$P.txt"; grep -iE "distinct|8-way|fully" "$OUT/p$P.txt" | head -6
    continue
  fi
  CALLGRIND_OPTS=--cache-sim=yes LB_PLACEMENT=$P flock /tmp/bench.lock "$HERE/l7-instructions.sh" "$BIN" "$MODE" "$N" "$OUT/p$P" \
    > "$OUT/p$P.log" 2>&1 || { echo "placement $P failed:"; tail -5 "$OUT/p$P.log"; exit 1; }
  ev() { awk -v e="$1" '$1 == e { print $2 }' "$OUT/p$P.log"; }
  IR=$(ev Ir); MR=$(ev D1mr); MW=$(ev D1mw)
  [ -n "$IR" ] || { echo "placement $P: no per-request figures in $OUT/p$P.log"; exit 1; }
  D1=$(awk -v r="$MR" -v w="$MW" 'BEGIN { printf "%.1f", r + w }')
  printf 'placement %2s: Ir %9.1f  D1 misses %6.1f (D1mr %6.1f, D1mw %6.1f)\n' "$P" "$IR" "$D1" "$MR" "$MW"
  IRS+=("$IR"); MISSES+=("$D1")
done
if [ "${FOOTPRINT:-0}" != 1 ]; then
  stats Ir "${IRS[@]}"
  stats "D1 misses" "${MISSES[@]}"
fi

#!/bin/bash
# usage: scripts/l7-footprint.sh LB_BIN [requests] [out-dir]
# Every data access `lb` makes while it serves HTTP/1.1 on ONE keep-alive connection, in the
# steady state: valgrind's lackey (`--trace-mem=yes`) traces `lb run` (one tokio worker, the
# nginx backend of scripts/bench-backend.sh, the listener and rule l7-instructions.sh's h1
# mode uses); 300 requests warm it up, then the trace's byte offsets before and after
# `requests` more (default 200; h2load --h1 -c1) bound the measured part. With one connection
# nothing but `lb`'s own request path touches memory between two requests, so what misses a
# cache here misses because the request path touches more than the cache holds (or maps too
# much onto one set). Read the result with scripts/footprint.py OUT LB_BIN requests.
# Writes OUT/trace (about 1.3 MB per request: instructions and data accesses), OUT/maps (the
# traced process's mappings), OUT/start, OUT/end. Needs valgrind, nginx, h2load, curl. Ports
# PORT_BASE (default 24050) and +1. Slow: about 3-4 minutes for the defaults.
set -euo pipefail
BIN=$1; NREQ=${2:-200}; OUT=${3:-./l7-footprint}
PB=${PORT_BASE:-24050}; BE=$PB; HTTP=$((PB + 1))
D=$(mktemp -d); mkdir -p "$OUT"
NG=; PP=
cleanup() { for p in $PP $NG; do kill $p 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
. "$(dirname "$0")/bench-backend.sh"
start_backend "$D" $BE
TOKIO_WORKER_THREADS=1 valgrind --tool=lackey --trace-mem=yes --log-fd=9 "$BIN" run \
  --listener web=http://127.0.0.1:$HTTP --target-group be,health-check=off \
  --target be=127.0.0.1:$BE --rule web,default,forward=be --admin-socket $D/admin.sock \
  9> "$OUT/trace" > $D/proxy.log 2>&1 & PP=$!
for i in $(seq 600); do curl -s -o /dev/null http://127.0.0.1:$HTTP/ && break; sleep 0.2; done
curl -sf -o /dev/null http://127.0.0.1:$HTTP/ || { echo "lb did not come up:"; cat $D/proxy.log; exit 1; }
h2load --h1 -c1 -n 300 http://127.0.0.1:$HTTP/ > /dev/null
sleep 2
cat /proc/$PP/maps > "$OUT/maps"
wc -c < "$OUT/trace" > "$OUT/start"
h2load --h1 -c1 -n "$NREQ" http://127.0.0.1:$HTTP/ | grep -q "$NREQ succeeded" \
  || { echo "not every measured request succeeded"; exit 1; }
sleep 2
wc -c < "$OUT/trace" > "$OUT/end"
echo "traced $NREQ requests into $OUT (bytes $(cat "$OUT/start")-$(cat "$OUT/end"))"

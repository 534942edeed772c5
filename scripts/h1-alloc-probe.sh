#!/bin/bash
# usage: scripts/h1-alloc-probe.sh LB_BINARY MODE [secs]   MODE: allocs | record | plain (needs root, perf, nginx, wrk)
# allocs: mimalloc uprobes counted with perf stat over a wrk run (divide by the requests);
#   RECORD_ALLOCS=1 also records their call sites. record: perf record -F 2999 -g into ./cpu.data.
# nginx backend on 127.0.0.1:19080, lb on 19081; wrk -t1 -c64.
set -u
LB=$1; MODE=$2; SECS=${3:-4}
D=$(mktemp -d)
NG=; LBP=
# Everything it starts or adds is removed, also when it fails or is interrupted.
cleanup() { perf probe -d 'probe_lb:*' >/dev/null 2>&1; [ -n "$LBP" ] && kill $LBP 2>/dev/null; [ -n "$NG" ] && kill $NG 2>/dev/null; wait 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
. "$(dirname "$0")/bench-backend.sh"
start_backend "$D" 19080
$LB run --listener web=http://127.0.0.1:19081 --target-group be,health-check=off --target be=127.0.0.1:19080 \
   --rule web,default,forward=be --admin-socket $D/admin.sock > $D/lb.log 2>&1 & LBP=$!
for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:19081/ && break; sleep 0.1; done
wrk -t1 -c64 -d1s http://127.0.0.1:19081/ > /dev/null
case $MODE in
allocs)
  perf probe -d 'probe_lb:*' >/dev/null 2>&1
  for f in mi_malloc_aligned mi_zalloc_aligned mi_realloc_aligned; do perf probe -x $LB $f >/dev/null 2>&1 || echo "probe $f failed"; done
  perf stat -e 'probe_lb:*' -p $LBP -o $D/stat.txt -- sleep $((SECS+1)) & PS=$!
  sleep 0.5
  wrk -t1 -c64 -d${SECS}s http://127.0.0.1:19081/ > $D/wrk.txt
  wait $PS
  cat $D/stat.txt; grep -E "requests in|Requests/sec" $D/wrk.txt
  if [ "${RECORD_ALLOCS:-}" = 1 ]; then
    perf record -e 'probe_lb:*' --call-graph dwarf -p $LBP -o $D/allocs.data -- sleep 2 & PR=$!
    sleep 0.3; wrk -t1 -c64 -d1s http://127.0.0.1:19081/ > /dev/null; wait $PR
    perf report -i $D/allocs.data --no-children --stdio -g caller,0.5,callee --percent-limit 1 2>/dev/null > ./allocs-report.txt
  fi
  perf probe -d 'probe_lb:*' >/dev/null 2>&1
  ;;
record)
  perf record -F 2999 -g -p $LBP -o ./cpu.data -- sleep $((SECS+1)) & PR=$!
  sleep 0.5
  wrk -t1 -c64 -d${SECS}s http://127.0.0.1:19081/ > $D/wrk.txt; wait $PR
  grep -E "Requests/sec" $D/wrk.txt
  ;;
plain)
  wrk -t1 -c64 -d${SECS}s http://127.0.0.1:19081/ ;;
esac

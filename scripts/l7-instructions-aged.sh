#!/bin/bash
# usage: scripts/l7-instructions-aged.sh LB [age-seconds] [measure-seconds] [out-dir]
# As l7-instructions.sh h2, but on HTTP/2 connections that are already AGE seconds old (default
# 70): h2load opens its 16 connections (10 streams each), sends for AGE seconds of warm-up, then
# for MEASURE seconds (default 20) during which the proxy's instructions are counted; per
# request = Ir(measured) / requests h2load counted in that window. This is the steady state of
# a long-lived HTTP/2 connection, whose HPACK encoder table has filled up (a fresh connection's
# has not, so l7-instructions.sh sees a cost that depends on how long its loads take).
# Not exact to the instruction: the window's edges are set by sleeps (one second of slop is a
# few per cent of the requests); compare builds with equal AGE and MEASURE.
set -u
PB=${PORT_BASE:-19180}; BE=$PB; HTTP=$((PB + 1)); TLS=$((PB + 2))
PROXY=$1; AGE=${2:-70}; MEAS=${3:-20}; OUT=${4:-./l7-instructions-aged}
D=$(mktemp -d)
mkdir -p "$OUT"
NG=; PP=; LP=
cleanup() { for p in $LP $PP $NG; do kill $p 2>/dev/null; done; wait 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
BODY=lb-bench-response-body-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz-01
cat > $D/backend.conf <<EOC
worker_processes 1;
daemon off;
pid $D/backend.pid;
error_log $D/backend-error.log;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:$BE backlog=4096; default_type text/plain;
    location / { return 200 "$BODY"; } }
}
EOC
nginx -c $D/backend.conf -p $D & NG=$!
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout $D/key.pem -out $D/cert.pem -days 2 >/dev/null 2>&1
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file=$D/cg.%p --dump-instr=no \
  --collect-jumps=no "$PROXY" run --listener web=http://127.0.0.1:$HTTP \
  --listener tls=https://127.0.0.1:$TLS,cert=$D/cert.pem:$D/key.pem \
  --target-group be,health-check=off --target be=127.0.0.1:$BE \
  --rule web,default,forward=be --rule tls,default,forward=be \
  --admin-socket $D/admin.sock > $D/proxy.log 2>&1 & PP=$!
for i in $(seq 300); do curl -s -o /dev/null http://127.0.0.1:$HTTP/ && break; sleep 0.2; done
curl -sf -o /dev/null http://127.0.0.1:$HTTP/ || { echo "the proxy did not come up:"; cat $D/proxy.log; exit 1; }
h2load -c16 -m10 -D $MEAS --warm-up-time $AGE https://127.0.0.1:$TLS/ > $D/load.txt 2>&1 & LP=$!
sleep $AGE
callgrind_control -z $PP > /dev/null 2>&1
wait $LP; LP=
rm -f $D/cg.*.[0-9]*
callgrind_control -d $PP > /dev/null 2>&1
for i in $(seq 100); do ls $D/cg.*.[0-9]* >/dev/null 2>&1 && break; sleep 0.1; done
sleep 0.5
F=$(ls -t $D/cg.*.[0-9]* | head -1)
cp "$F" "$OUT/callgrind.aged"
IR=$(grep -E "^totals:" "$F" | awk '{print $2}')
REQ=$(grep -E "^requests:" $D/load.txt | awk '{print $8}')
grep -E "^requests:" $D/load.txt
echo "$(basename "$PROXY") h2 aged ${AGE}s: $(( IR / REQ )) instructions/request (Ir ${IR} for ${REQ} requests)"

#!/bin/bash
# usage: scripts/l7-instructions.sh PROXY MODE [requests] [out-dir]
#   PROXY: a path to an lb binary, or `haproxy`, or `nginx`.   MODE: h1 | h2 | h2aged, or (lb
#   only) one of the paths the PGO training does not run, each HTTP/1.1 like h1 unless said:
#     h1log      the access log on (to a file)        h2log     HTTP/2 like h2, the access log on
#     h1big64k   a 65,536-byte response body        h1big1m   a 1,048,576-byte response body
#     h1post     a POST with a 65,536-byte request body (100-byte response)
#     h1tls      an HTTPS target (protocol=https)
#     h2h2t      HTTP/2 like h2, to an HTTP/2 target (h2c; ALB answers an HTTP/1 client 464)
#     h1fixed    a fixed-response rule (200, 100-byte body), no target
#     h1redirect a redirect rule (301 to https://…), no target
#     h1e503     a target group with no targets: lb's own 503
#     h1e463     31 X-Forwarded-For addresses: lb's own 463
#   (these use a second nginx on PORT_BASE+10 and +11, and h2h2t HAProxy on +12:
#   scripts/bench-backend.sh start_extra_backend, start_h2c_backend)
# Counts the user-space instructions one proxied request costs, exactly, with valgrind's
# callgrind (needs root, valgrind, nginx, h2load; haproxy for PROXY=haproxy). The proxy runs
# under callgrind with one worker thread/process, behind an nginx backend (100-byte body,
# keep-alive); h2load sends the requests (h1: --h1, 16 connections; h2: TLS, 16 connections,
# 10 streams each). The counters are zeroed after a warm-up, then two loads of N and 2N
# requests are counted; per request = (Ir(2N) - Ir(N)) / N, which cancels what the loads
# share (connection set-up, TLS handshakes, timers that fire per load).
# Output: one line `PROXY MODE instructions/request`, and OUT/callgrind.2n (the 2N load's
# profile: read it with `callgrind_annotate --inclusive=yes OUT/callgrind.2n`).
# Kernel time is not counted: this is the user-time half of the per-request CPU cost.
# Deterministic within a few hundred instructions, so an A/B of two builds needs one run each.
# MODE h1conn: per connection instead of per request, full TLS handshakes as `cargo xtask bench
# l7`'s handshake figure makes them (`openssl s_time -new -www /`): each connection a new
# TLS session (no resumption; ECDSA P-256 certificate, the client's default groups), one
# `GET / HTTP/1.0`, the response read until the proxy closes, then closed without
# close_notify as s_time does. The client is a small Python ssl loop (one connection after
# another, so the count is exact; a response without 200 and the 100-byte body is a failure);
# N is connections (300-1000 keeps a run under 2 minutes), the warm-up 200 connections, and
# per connection = (Ir(2N) - Ir(N)) / N.
# MODE h2aged (AGE and MEAS seconds, defaults 70 and 20): HTTP/2 on connections already AGE
# seconds old, the steady state of a long-lived connection whose HPACK table has filled up
# (N and 2N loads on fresh connections never reach it): h2load sends for AGE seconds of
# warm-up, then for MEAS seconds during which the instructions are counted; per request =
# Ir / the requests h2load counted in that window. Not exact to the instruction (the window's
# edges are set by sleeps: a few per cent); compare builds with equal AGE and MEAS.
set -u
# PORT_BASE (default 19180): the backend listens there, the proxy on +1 (HTTP) and +2 (TLS),
# so runs with different bases can go side by side.
PB=${PORT_BASE:-19180}; BE=$PB; HTTP=$((PB + 1)); TLS=$((PB + 2)); BE2=$((PB + 10))
PROXY=$1; MODE=$2; N=${3:-20000}; OUT=${4:-./l7-instructions}
D=$(mktemp -d)
mkdir -p "$OUT"
NG=; NG2=; NG3=; PP=; LP=
cleanup() { for p in $LP $PP $NG $NG2 $NG3; do kill $p 2>/dev/null; done; wait 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
. "$(dirname "$0")/bench-backend.sh"
start_backend "$D" $BE
# A throwaway ECDSA P-256 certificate, as the L7 bench uses.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout $D/key.pem -out $D/cert.pem -days 2 >/dev/null 2>&1
cat $D/cert.pem $D/key.pem > $D/both.pem
# The untrained-path modes: what lb is configured with (group, target, rule, extra flags) and
# which path the load asks for. h1, h2 and h2aged keep the configuration they always had.
GROUP=be,health-check=off; TARGET=(--target be=127.0.0.1:$BE); RULE=forward=be; EXTRA=(); URL=/
TLSRULE=
LOADX=()
case $MODE in
h1 | h2 | h2aged | h1conn) ;;
h1log | h2log) EXTRA=(--access-log $D/access.log) ;;
h1big64k) TARGET=(--target be=127.0.0.1:$BE2); URL=/64k ;;
h1big1m) TARGET=(--target be=127.0.0.1:$BE2); URL=/1m ;;
h1post) TARGET=(--target be=127.0.0.1:$BE2)
  head -c 65536 /dev/zero | tr '\0' p > $D/post; LOADX=(-d $D/post) ;;
h1tls) GROUP=be,health-check=off,protocol=https; TARGET=(--target be=127.0.0.1:$((BE2 + 1))) ;;
h2h2t) GROUP=be,health-check=off,protocol-version=http2; TARGET=(--target be=127.0.0.1:$((BE2 + 2))) ;;
h1fixed) RULE="fixed-response=200,content-type=text/plain,body=$BENCH_BODY" ;;
h1redirect) RULE="redirect=https://#{host}:$TLS/#{path}?#{query},status=301"; TLSRULE=forward=be ;;
h1e503) TARGET=() ;;
h1e463) LOADX=(-H "X-Forwarded-For: $(seq -s ', ' -f '10.0.0.%g' 31)") ;;
*) echo "MODE is h1, h2, h2aged, h1conn, h1log, h2log, h1big64k, h1big1m, h1post, h1tls, h2h2t, h1fixed, h1redirect, h1e503 or h1e463, not $MODE"; exit 2 ;;
esac
case $MODE in h1 | h2 | h2aged | h1conn) ;; *)
  case $PROXY in haproxy | nginx) echo "MODE $MODE is for lb only"; exit 2 ;; esac
  start_extra_backend "$D" $BE2 $D/cert.pem $D/key.pem
  [ "$MODE" = h2h2t ] && start_h2c_backend "$D" $((BE2 + 2)) ;;
esac
# CALLGRIND_OPTS adds callgrind options, e.g. "--cache-sim=yes --branch-sim=yes": then every
# event (cache misses, mispredicted branches) is also printed per request. The cache mode,
# CALLGRIND_OPTS=--cache-sim=yes, is cachegrind's simulation (I1, D1 and the last level, sized
# from the host's CPUID: `valgrind --tool=callgrind --cache-sim=yes -v true` prints them) and
# prints I1mr (instruction fetches that missed the L1 instruction cache) and ILmr (missed the
# last level too) per request beside Ir: the instruction-cache cost of a code layout (PGO vs
# BOLT), deterministic like Ir, on a VM without hardware counters. Valgrind simulates no L2:
# an I1 miss is a fetch from L2 or beyond.
VG=(valgrind --tool=callgrind --callgrind-out-file=$D/cg.%p --dump-instr=no --collect-jumps=no ${CALLGRIND_OPTS:-})
case $PROXY in
haproxy)
  cat > $D/haproxy.cfg <<EOC
global
  maxconn 8000
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe_http
  bind 127.0.0.1:$HTTP
  default_backend be
frontend fe_https
  bind 127.0.0.1:$TLS ssl crt $D/both.pem alpn h2,http/1.1
  default_backend be
backend be
  server s1 127.0.0.1:$BE
EOC
  "${VG[@]}" haproxy -db -f $D/haproxy.cfg > $D/proxy.log 2>&1 & PP=$! ;;
nginx)
  cat > $D/proxy.conf <<EOC
worker_processes 1;
master_process off;
daemon off;
pid $D/proxy.pid;
error_log $D/proxy-error.log;
events { worker_connections 16384; }
http {
  access_log off; keepalive_requests 100000000;
  upstream be { server 127.0.0.1:$BE; keepalive 256; }
  server { listen 127.0.0.1:$HTTP; listen 127.0.0.1:$TLS ssl http2;
    ssl_certificate $D/cert.pem; ssl_certificate_key $D/key.pem;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
EOC
  "${VG[@]}" nginx -c $D/proxy.conf -p $D > $D/proxy.log 2>&1 & PP=$! ;;
*)
  TOKIO_WORKER_THREADS=1 "${VG[@]}" "$PROXY" run --listener web=http://127.0.0.1:$HTTP \
    --listener tls=https://127.0.0.1:$TLS,cert=$D/cert.pem:$D/key.pem \
    --target-group $GROUP "${TARGET[@]}" \
    --rule web,default,$RULE --rule tls,default,${TLSRULE:-$RULE} "${EXTRA[@]}" \
    --admin-socket $D/admin.sock > $D/proxy.log 2>&1 & PP=$! ;;
esac
for i in $(seq 300); do curl -s -o /dev/null http://127.0.0.1:$HTTP/ && break; sleep 0.2; done
case $MODE in
h1 | h2 | h2aged | h1conn)
  curl -sf -o /dev/null http://127.0.0.1:$HTTP/ || { echo "the proxy did not come up:"; cat $D/proxy.log; exit 1; } ;;
*) # the untrained paths: each mode must produce the status it is meant to, or nothing is counted
  # (h2load counts a 4xx or 5xx as failed: ERRS lets the error modes' loads be all such)
  case $MODE in h1redirect) WANT=301 ;; h1e503) WANT=503; ERRS=1 ;; h1e463) WANT=463; ERRS=1 ;; *) WANT=200 ;; esac
  case $MODE in h1post) CURLX=(--data-binary @$D/post) ;; h1e463) CURLX=("${LOADX[@]}") ;;
  h2h2t) CURLX=(--http2-prior-knowledge) ;; *) CURLX=() ;; esac
  GOT=$(curl -s -o /dev/null -w '%{http_code}' "${CURLX[@]}" http://127.0.0.1:$HTTP$URL)
  [ "$GOT" = "$WANT" ] || { echo "MODE $MODE: status $GOT, not $WANT:"; cat $D/proxy.log; exit 1; } ;;
esac
case $MODE in
h1) LOAD=(h2load --h1 -c16 -m1 http://127.0.0.1:$HTTP/) ;;
h1conn) # prints h2load's summary words, so count() checks it the same way
  cat > $D/conns.py <<'EOP'
import socket, ssl, sys
# conns.py PORT BODY -n N (the load's count comes last, as h2load's -n)
port, body, n = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ok = 0
for _ in range(n):
    with socket.create_connection(("127.0.0.1", port)) as raw:
        s = ctx.wrap_socket(raw)  # no session given: a full handshake every time
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        got = b""
        while True:
            try:
                b = s.recv(65536)
            except (ssl.SSLEOFError, ConnectionResetError):
                break
            if not b:
                break
            got += b
        ok += got.startswith(b"HTTP/1.") and b" 200 " in got[:16] and got.endswith(b"\r\n\r\n" + body)
        s.close()  # no close_notify (only unwrap() sends it), as s_time
print(f"requests: {n} total, {n} started, {n} done, {ok} succeeded, {n - ok} failed, 0 errored")
EOP
  LOAD=(python3 $D/conns.py $TLS "$BENCH_BODY") ;;
h2 | h2aged | h2h2t | h2log) LOAD=(h2load -c16 -m10 https://127.0.0.1:$TLS/) ;;
*) LOAD=(h2load --h1 -c16 -m1 "${LOADX[@]}" http://127.0.0.1:$HTTP$URL) ;;
esac
dump() { # dumps what was counted since the last zeroing to OUT/$1; prints its Ir total
  rm -f $D/cg.*.[0-9]*
  callgrind_control -d $PP > /dev/null 2>&1
  for i in $(seq 100); do ls $D/cg.*.[0-9]* >/dev/null 2>&1 && break; sleep 0.1; done
  sleep 0.5
  cp "$(ls -t $D/cg.*.[0-9]* | head -1)" "$OUT/$1"
  grep -E "^totals:" "$OUT/$1" | awk '{print $2}'
}
count() { # zero, load N requests, dump to OUT/$2; prints the instructions counted
  callgrind_control -z $PP > /dev/null 2>&1
  "${LOAD[@]}" -n $1 > $D/load.txt 2>&1
  grep -q "succeeded, 0 failed, 0 errored" $D/load.txt || grep -q "$1 succeeded" $D/load.txt \
    || { [ -n "${ERRS:-}" ] && grep -q "$1 done, 0 succeeded, $1 failed, 0 errored" $D/load.txt; } \
    || { echo "load of $1 had failures:"; grep -E "requests:|status codes" $D/load.txt; exit 1; }
  dump "$2"
}
if [ "$MODE" = h2aged ]; then
  AGE=${AGE:-70}; MEAS=${MEAS:-20}
  "${LOAD[@]}" -D $MEAS --warm-up-time $AGE > $D/load.txt 2>&1 & LP=$!
  sleep $AGE
  callgrind_control -z $PP > /dev/null 2>&1
  wait $LP; LP=
  IR=$(dump callgrind.aged)
  REQ=$(grep -E "^requests:" $D/load.txt | awk '{print $8}')
  grep -E "^requests:" $D/load.txt
  echo "$(basename "$PROXY") h2 aged ${AGE}s: $(( IR / REQ )) instructions/request (Ir ${IR} for ${REQ} requests)"
  exit 0
fi
"${LOAD[@]}" -n $([ $MODE = h1conn ] && echo 200 || echo 2000) > /dev/null 2>&1   # warm-up: pools, allocator, lazy statics
# count's failure message is its output: print it and stop (inside $(…) its exit ends only the
# subshell, and the arithmetic below then failed on the message's words instead).
A=$(count $N callgrind.n) || { echo "$A"; exit 1; }
B=$(count $((2 * N)) callgrind.2n) || { echo "$B"; exit 1; }
echo "$(basename "$PROXY") $MODE $(( (B - A) / N )) instructions/$([ $MODE = h1conn ] && echo connection || echo request) (Ir: ${A} for $N, ${B} for $((2 * N)))"
# h1log, h2log: every request must have its line (lb drops lines rather than wait for the writer).
case $MODE in h1log | h2log) echo "  access log: $(wc -l < $D/access.log) lines for $((3 * N + 2000)) requests and the readiness checks" ;; esac
if [ -n "${CALLGRIND_OPTS:-}" ]; then # every event, per request, the same way
  paste <(grep -E "^events:" "$OUT/callgrind.2n" | cut -d' ' -f2- | tr ' ' '\n') \
        <(grep -E "^totals:" "$OUT/callgrind.n" | cut -d' ' -f2- | tr ' ' '\n') \
        <(grep -E "^totals:" "$OUT/callgrind.2n" | cut -d' ' -f2- | tr ' ' '\n') |
    awk -v n=$N '{ printf "  %-5s %10.1f per request\n", $1, ($3 - $2) / n }'
fi

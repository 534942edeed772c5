# Sourced by the probe scripts (scripts/h1-alloc-probe.sh, scripts/l7-instructions.sh): the
# nginx backend every L7 measurement puts behind the proxy, as `cargo xtask bench l7` configures
# it (one worker, keep-alive without limits, logs off, a 100-byte body).
# BENCH_BODY: the 100-byte body every backend here answers with (xtask/src/bench_l7.rs's
# BODY, which `cargo xtask bench l7` serves, and scripts/h1-kernel-side.py's are the same).
BENCH_BODY=lb-bench-response-body-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz-01
# start_backend DIR PORT: writes DIR/backend.conf, starts nginx in the background and sets NG
# to its pid (the caller's cleanup kills it).
start_backend() {
  local dir=$1 port=$2
  cat > "$dir/backend.conf" <<EOC
worker_processes 1;
daemon off;
pid $dir/backend.pid;
error_log $dir/backend-error.log;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:$port backlog=4096; default_type text/plain;
    location / { return 200 "$BENCH_BODY"; } }
}
EOC
  nginx -c "$dir/backend.conf" -p "$dir" &
  NG=$!
}

# start_extra_backend DIR PORT CERT KEY: a second nginx (pid in NG2; the caller kills it) for
# the probes of paths the 100-byte backend does not reach (scripts/l7-instructions.sh's modes
# beyond h1/h2): on PORT plain HTTP/1.1, on PORT+1 HTTPS (HTTP/1.1, CERT and KEY). Each serves /
# (the same 100-byte body, for any method: a POST's body is read and discarded), /64k and /1m
# (static bodies of 65,536 and 1,048,576 bytes).
start_extra_backend() {
  local dir=$1 port=$2 cert=$3 key=$4
  chmod o+x "$dir"   # nginx's workers (not root) read the static bodies from it
  head -c 65536 /dev/zero | tr '\0' a > "$dir/64k"
  head -c 1048576 /dev/zero | tr '\0' b > "$dir/1m"
  local locs="default_type text/plain; client_max_body_size 0;
    location = /64k { alias $dir/64k; }
    location = /1m { alias $dir/1m; }
    location / { return 200 \"$BENCH_BODY\"; }"
  cat > "$dir/backend2.conf" <<EOC
worker_processes 1;
daemon off;
pid $dir/backend2.pid;
error_log $dir/backend2-error.log;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:$port backlog=4096; $locs }
  server { listen 127.0.0.1:$((port + 1)) ssl backlog=4096;
    ssl_certificate $cert; ssl_certificate_key $key; $locs }
}
EOC
  nginx -c "$dir/backend2.conf" -p "$dir" &
  NG2=$!
}

# start_h2c_backend DIR PORT: HAProxy answering HTTP/2 with prior knowledge (h2c) on PORT with the
# same 100-byte body (pid in NG3; the caller kills it). Not nginx: nginx 1.22 answers 400
# ("duplicate host header") to a request that has both :authority and Host, as lb's HTTP/2
# client sends them.
start_h2c_backend() {
  local dir=$1 port=$2
  cat > "$dir/h2c.cfg" <<EOC
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend h2c
  bind 127.0.0.1:$port proto h2
  http-request return status 200 content-type text/plain string "$BENCH_BODY"
EOC
  haproxy -db -f "$dir/h2c.cfg" > "$dir/h2c.log" 2>&1 &
  NG3=$!
}

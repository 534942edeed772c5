# Sourced by the probe scripts (scripts/h1-alloc-probe.sh, scripts/l7-instructions.sh): the
# nginx backend every L7 measurement puts behind the proxy, as `cargo xtask bench l7` configures
# it (one worker, keep-alive without limits, logs off, a 100-byte body).
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
    location / { return 200 "lb-bench-response-body-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdefghijklmnopqrstuvwxyz-01"; } }
}
EOC
  nginx -c "$dir/backend.conf" -p "$dir" &
  NG=$!
}

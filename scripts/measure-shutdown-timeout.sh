#!/bin/bash
# What nginx's worker_shutdown_timeout does to held SSE streams and old worker generations
# (docs/operations.md, "Old worker generations and worker_shutdown_timeout").
# Usage: bash scripts/measure-shutdown-timeout.sh ["worker_shutdown_timeout 3s;"]
# Needs nginx and the stand-in (cargo build --features standins); runs a private nginx on
# loopback, opens a heartbeat tab before each of 5 reloads, and prints the old workers and the
# RSS of all nginx processes over 8 s, then how each tab's stream ended.
set -u
DIRECTIVE=${1:-}
STANDIN=${STANDIN:-target/debug/kotaemon-standin}
D=$(mktemp -d); mkdir -p "$D/conf" "$D/logs" "$D/tmp"
P=$((20000 + RANDOM % 10000)); B=$((30000 + RANDOM % 10000))
"$STANDIN" --listen 127.0.0.1:$B --name alpha --heartbeat-interval 1s >/dev/null 2>&1 &
SP=$!
USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root;"
cat > "$D/conf/nginx.conf" <<NG
$USER_LINE
worker_processes 2;
$DIRECTIVE
pid logs/nginx.pid; error_log logs/error.log notice;
events { worker_connections 512; }
http { access_log off; client_body_temp_path tmp/c; proxy_temp_path tmp/p; fastcgi_temp_path tmp/f; uwsgi_temp_path tmp/u; scgi_temp_path tmp/s;
 upstream k { server 127.0.0.1:$B; keepalive 8; }
 server { listen 127.0.0.1:$P; location / { proxy_pass http://k; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; proxy_read_timeout 3600s; } } }
NG
sleep 0.5
nginx -p "$D" -c conf/nginx.conf -g 'daemon off;' & NP=$!
sleep 0.5
M=$(cat "$D/logs/nginx.pid")
rss() { local t=0 r; for p in $M $(pgrep -P "$M"); do r=$(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null); t=$((t + ${r:-0})); done; echo $t; }
old() { for p in $(pgrep -P "$M"); do tr '\0' ' ' < /proc/$p/cmdline; echo; done | grep -c "shutting down"; }
echo "RSS before: $(rss) kB"
for i in 1 2 3 4 5; do
  ( curl -sN --max-time 12 http://127.0.0.1:$P/heartbeat/tab-$i > "$D/tab-$i.out" 2>&1; echo $? > "$D/tab-$i.rc" ) &
  sleep 0.3
  kill -HUP "$M"; sleep 0.4
done
echo "after 5 reloads with a tab opened before each: old workers shutting down=$(old), RSS=$(rss) kB"
for s in 1 2 3 4 6 8; do sleep 1; echo "  t+~$s s: old=$(old) RSS=$(rss) kB"; done
sleep 5
echo "tabs (curl exit 28: still streaming at its 12 s limit; 18: the body was cut short):"
for i in 1 2 3 4 5; do echo "  tab-$i: $(grep -c ALIVE "$D/tab-$i.out") ALIVE lines, curl exit $(cat "$D/tab-$i.rc")"; done
kill $NP $SP; wait $NP $SP 2>/dev/null
rm -rf "$D"

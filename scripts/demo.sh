#!/usr/bin/env bash
# The demo: a private nginx on 127.0.0.1:8080, three stand-in Kotaemon replicas on
# 127.0.0.{2,3,4}:7860, and upstreamd keeping `upstream kotaemon` true. Shows the membership
# changing as a replica fails and recovers, then keeps running until Ctrl-C
# (`--no-wait` stops right after the show).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bash scripts/install-deps.sh
cargo build --release --bins --locked --features standins
bin=$root/target/release
dir=$(mktemp -d /tmp/upstreamd-demo.XXXXXX)
mkdir -p "$dir"/{conf,logs,tmp}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

user=""; [ "$(id -u)" -eq 0 ] && user="user root;"
cat > "$dir/conf/nginx.conf" <<NGX
$user
worker_processes 2;
pid logs/nginx.pid;
error_log logs/error.log notice;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path tmp/client; proxy_temp_path tmp/proxy; fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;
    include upstreams.conf;
    include kotaemon-site.conf;
}
NGX
cp examples/nginx/kotaemon-site.conf "$dir/conf/"
echo 'upstream kotaemon { server 127.0.0.1:1 down; } map $uri $kotaemon_affinity_route { default kotaemon; } map $uri $kotaemon_affinity_cookie { default ""; }' > "$dir/conf/upstreams.conf"
sed "s|@DIR@|$dir|g" examples/demo.toml > "$dir/upstreamd.toml"

for i in 2 3 4; do
  name=(x x alpha bravo charlie); echo healthy > "$dir/mode-$i"
  "$bin/kotaemon-standin" --listen "127.0.0.$i:7860" --name "${name[$i]}" --control-file "$dir/mode-$i" 2>>"$dir/replicas.log" &
  pids+=($!)
done
nginx -p "$dir" -c conf/nginx.conf -g 'daemon off;' & pids+=($!)
"$bin/upstreamd" run --config "$dir/upstreamd.toml" 2> >(sed 's/^/[upstreamd] /' >&2) & pids+=($!)

reloads() { grep -c 'signal 1 (SIGHUP) received' "$dir/logs/error.log" || true; }
# A different affinity cookie per request, as 30 different browsers would send.
spread() { for i in $(seq 30); do curl -s -H "Cookie: kh_affinity=demo$i" http://127.0.0.1:8080/ | awk '{print $NF}'; done | sort | uniq -c | tr '\n' ' '; echo; }
wait_for() { for _ in $(seq 100); do eval "$1" && return 0; sleep 0.1; done; echo "timed out: $1"; exit 1; }
show() { echo; echo "== $1"; grep -E '^\s+server' "$dir/conf/upstreams.conf"; echo "   traffic over 30 requests: $(spread)"; echo "   nginx reloads so far: $(reloads)"; }

settled() { wait_for "[ \$(reloads) -ge $1 ]"; sleep 0.3; }  # reload done, old workers gone
wait_for 'grep -q "127.0.0.4:7860;" "$dir/conf/upstreams.conf"'
settled 1
show "three healthy replicas"
echo error > "$dir/mode-3"
wait_for 'grep -q "127.0.0.3:7860 down;" "$dir/conf/upstreams.conf"'
settled 2
show "bravo answers 503 on /queue/status: marked down, no traffic, one reload"
echo healthy > "$dir/mode-3"
wait_for 'grep -q "127.0.0.3:7860;" "$dir/conf/upstreams.conf"'
settled 3
show "bravo recovered: back in, one more reload"
echo
echo "nginx: http://127.0.0.1:8080/   status page: http://127.0.0.1:9187/   files: $dir"
echo "fail a replica yourself: echo error > $dir/mode-2   (healthy | error | hang | slow:800)"
if [ "${1:-}" = "--no-wait" ]; then exit 0; fi
echo "Ctrl-C stops everything."
wait

#!/usr/bin/env bash
# The demo: a private nginx on 127.0.0.1:8080, three stand-in Kotaemon replicas on
# 127.0.0.{2,3,4}:7860, and upstreamd keeping `upstream kotaemon` true. Shows the membership
# changing as a replica fails and recovers, then keeps running until Ctrl-C
# (`--no-wait` stops right after the show). `UPSTREAMD_DEMO_APPLY=lua` runs it with
# `apply = "lua"` (needs libnginx-mod-http-lua and lua-resty-core): the same changes, no reloads.
set -euo pipefail
mode=${UPSTREAMD_DEMO_APPLY:-reload}
case "$mode" in reload|lua) ;; *) echo "UPSTREAMD_DEMO_APPLY must be reload or lua, not $mode"; exit 2;; esac
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
modules=""
if [ "$mode" = lua ]; then
  [ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || { echo "lua mode needs: apt-get install libnginx-mod-http-lua lua-resty-core"; exit 1; }
  modules="load_module /usr/lib/nginx/modules/ndk_http_module.so; load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;"
fi
cat > "$dir/conf/nginx.conf" <<NGX
$modules
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
if [ "$mode" = lua ]; then
  sed -i 's|^min_reload_interval = .*|&\napply = "lua"\nlua_listen = "127.0.0.1:9180"|' "$dir/upstreamd.toml"
fi

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
# The membership nginx has: the include's server lines (reload), or the pushed list (lua).
members() {
  if [ "$mode" = lua ]; then
    grep -o '"address":"[^"]*","weight":[0-9]*,"backup":[a-z]*,"down":[a-z]*' "$dir/conf/upstreamd-lua/snapshot.json" 2>/dev/null | sed 's/^/    /' || true
  else
    grep -E '^\s+server' "$dir/conf/upstreams.conf" || true
  fi
}
has() { members | grep -q -- "$1"; }
if [ "$mode" = lua ]; then
  up4='"127.0.0.4:7860"'; down3='"127.0.0.3:7860".*"down":true'; up3='"127.0.0.3:7860".*"down":false'; r2=1; r3=1
else
  up4='127.0.0.4:7860;'; down3='127.0.0.3:7860 down;'; up3='127.0.0.3:7860;'; r2=2; r3=3
fi
show() { echo; echo "== $1"; members; echo "   traffic over 30 requests: $(spread)"; echo "   nginx reloads so far: $(reloads)"; }

settled() { wait_for "[ \$(reloads) -ge $1 ]"; sleep 0.3; }  # reload done, old workers gone
wait_for 'has "$up4"'
settled 1
show "three healthy replicas (apply = $mode)"
echo error > "$dir/mode-3"
wait_for 'has "$down3"'
settled $r2
show "bravo answers 503 on /queue/status: marked down, no traffic ($( [ "$mode" = lua ] && echo 'pushed, no reload' || echo 'one reload'))"
echo healthy > "$dir/mode-3"
wait_for 'has "$up3"'
settled $r3
show "bravo recovered: back in ($( [ "$mode" = lua ] && echo 'pushed, no reload' || echo 'one more reload'))"
echo
echo "nginx: http://127.0.0.1:8080/   status page: http://127.0.0.1:9187/   files: $dir"
echo "fail a replica yourself: echo error > $dir/mode-2   (healthy | error | hang | slow:800)"
if [ "${1:-}" = "--no-wait" ]; then exit 0; fi
echo "Ctrl-C stops everything."
wait

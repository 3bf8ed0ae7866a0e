#!/usr/bin/env bash
# The peer the popular "dynamic upstreams for nginx" articles suggest, as a benchmark baseline:
# every INTERVAL seconds, list the members, keep the ones whose health path answers (curl, 1 s),
# rewrite the upstream file and reload nginx (`nginx -t`, then SIGHUP) — whether or not
# anything changed. When no member answers, all are written (nginx refuses an empty upstream).
#
# usage: naive-reloader.sh OUTPUT NGINX_PREFIX INTERVAL HEALTH_PATH BALANCE -- MEMBERS_COMMAND...
#   BALANCE: sticky (the Kotaemon affinity maps + consistent hash) or round_robin.
#   MEMBERS_COMMAND prints one host:port per line, e.g. `cat members.txt` or
#   `etcdctl get --prefix /services/kotaemon/ --print-value-only`.
set -u
out=$1 prefix=$2 interval=$3 health=$4 balance=$5
shift 6
pidfile="$prefix/logs/nginx.pid"

render() {
  if [ "$balance" = sticky ]; then
    cat <<'MAPS'
map $uri $kotaemon_affinity_route { default kotaemon; }
map $cookie_kh_affinity $kotaemon_affinity_key {
    ""      $remote_addr;
    default $cookie_kh_affinity;
}
map $cookie_kh_affinity $kotaemon_affinity_cookie {
    ""      "kh_affinity=$request_id; Path=/; HttpOnly; SameSite=Lax";
    default "";
}
MAPS
  fi
  echo "upstream kotaemon {"
  echo "    zone kotaemon 64k;"
  [ "$balance" = sticky ] && echo '    hash $kotaemon_affinity_key consistent;'
  for m in "$@"; do echo "    server $m max_fails=1 fail_timeout=10s;"; done
  echo "    keepalive 32;"
  echo "}"
}

while true; do
  members=$("$@" 2>/dev/null | tr -d '\r' | grep -v '^$')
  up=()
  for m in $members; do
    curl -fsS -m 1 -o /dev/null "http://$m$health" 2>/dev/null && up+=("$m")
  done
  if [ ${#up[@]} -eq 0 ]; then
    # shellcheck disable=SC2206 # one member per word
    up=($members)
  fi
  if [ ${#up[@]} -gt 0 ]; then
    render "${up[@]}" > "$out.tmp" && mv "$out.tmp" "$out"
    nginx -p "$prefix" -c conf/nginx.conf -t -q && kill -HUP "$(cat "$pidfile")"
  fi
  sleep "$interval"
done

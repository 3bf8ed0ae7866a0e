#!/bin/sh
# Consul's place in the compose test stack: consul-standin (src/bin/consul-standin.rs) with
# its arguments, then the services of /consul/config/*.json registered through the agent API,
# as `consul agent -config-dir=/consul/config` would load them.
set -eu
consul-standin "$@" &
pid=$!
trap 'kill -TERM "$pid"' TERM INT
tries=0
until curl -sf http://127.0.0.1:8500/v1/status/leader >/dev/null; do
  tries=$((tries + 1))
  [ "$tries" -le 100 ] || { echo "consul-entrypoint: the stand-in did not answer" >&2; exit 1; }
  sleep 0.1
done
for file in /consul/config/*.json; do
  jq -c ".services[]" "$file" | while read -r service; do
    curl -sf -X PUT --data "$service" http://127.0.0.1:8500/v1/agent/service/register
  done
  echo "consul-entrypoint: registered the services of $file"
done
wait "$pid"

#!/usr/bin/env bash
# Instructions the proxy executes per request, counted by valgrind's callgrind.
#
#   bash benches/instructions.sh [PROXY_BIN]     # default: target/release/impersonate-proxy
#   MODE=a|c|d N=20000 bash benches/instructions.sh
#   UPSTREAM_H2=0 MODE=a bash benches/instructions.sh     # nginx offering HTTP/1.1 only
#   KEEP=/tmp/cg.out ...                                   # keep callgrind's output
#
# Wall-clock figures on a shared machine swing from run to run; instruction counts do not depend
# on what else the machine is doing, so two builds can be compared one after the other. The set-up
# is the shared harness's, on a small scale: oha drives the proxy (run under callgrind, so slowly)
# against Debian's nginx (TLS, h2 and HTTP/1.1, a small body), tokens from the proxy's own
# emulator. MODE is the harness's test: a = 64 keep-alive connections, c = a new connection per
# request (16 at once), d = h2, one connection with 100 streams (the default). Counting is zeroed
# after a warm-up, dumped after N requests, and divided by the 200s oha got. Under callgrind the
# proxy sees bigger batches than at full speed and no kernel time is counted: this is the
# proxy's own user-space work. Needs valgrind, oha, nginx and openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib/setup.sh
needs valgrind callgrind_control oha nginx openssl python3
bin=$(proxy_bin "${1:-}")
mode=${MODE:-d}
n=${N:-20000}
case $mode in
    a) args=(-c 64) ;;
    c) args=(-c 16 --disable-keepalive) ;;
    d) args=(-c 1 --http2 -p 100) ;;
    *) echo "MODE is a, c or d" >&2; exit 2 ;;
esac
listen_h2=http2
if [ "${UPSTREAM_H2:-1}" = 0 ]; then
    [ "$mode" = d ] && { echo "MODE=d needs an h2 upstream" >&2; exit 2; }
    listen_h2=
fi

# The origin (nginx with a certificate for the host from a CA of its own) and the emulator;
# then the proxy under callgrind (counting from the start, zeroed after warm-up).
proxy_port=$(free_port)
stage "$bin" "$proxy_port" $listen_h2
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$bin" run --config config.yaml \
    >proxy.log 2>valgrind.log &
proxy_pid=$!
pids+=($proxy_pid)
wait_port "$proxy_port" || { cat valgrind.log proxy.log >&2; exit 1; }

url="https://$host/storage/v1/b/bench-bucket/o/object.bin"
through=(-x "http://127.0.0.1:$proxy_port" --cacert "$work/ca.pem" -t 60s)
oha --no-tui -n 1000 "${args[@]}" "${through[@]}" "$url" >/dev/null
callgrind_control -z "$proxy_pid" >/dev/null 2>&1
oha --no-tui --output-format json -n "$n" "${args[@]}" "${through[@]}" "$url" >oha.json
callgrind_control -d "$proxy_pid" >/dev/null 2>&1
sleep 1
ok=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["statusCodeDistribution"].get("200", 0))' oha.json)
[ "${ok:-0}" -gt 0 ] || { echo "no request succeeded through the proxy" >&2; cat proxy.log >&2; exit 1; }
dump=$(ls cg.out.* | head -1)
[ -n "${KEEP:-}" ] && cp "$dump" "$KEEP"
total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
echo "proxy: $bin"
echo "mode $mode: $total instructions over $ok requests (200s of $n) = $((total / ok)) per request"

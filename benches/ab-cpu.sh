#!/usr/bin/env bash
# Two builds' CPU per request, interleaved: for differences smaller than the spread between runs
# of the shared harness (../shared/bench), whose A/B runs remain the figures that count.
#
#   MODE=a|c|d REPS=6 DURATION=5 UPSTREAM_H2=0|1 B_EXTRA='yaml line' \
#     bash benches/ab-cpu.sh BEFORE_BIN AFTER_BIN
#
# The harness's set-up on a small scale (benches/lib/setup.sh): Debian's nginx as the origin
# (h2 and HTTP/1.1, or HTTP/1.1 only with UPSTREAM_H2=0), one emulator, both builds running at
# once on ports of their own. oha then loads A, B, A, B, ... with test (a) (64 keep-alive
# clients), (c) (16 clients, a new connection per request) or (d) (one h2 connection, 100
# streams), and each line is that proxy's CPU (utime + stime from /proc/PID/stat over the load)
# divided by the 200 answers. B_EXTRA is appended to B's config (`limits: { workers: 1 }`, say).
# Needs oha, nginx, openssl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib/setup.sh
needs oha nginx openssl python3
A=$(proxy_bin "${1:?before build}")
B=$(proxy_bin "${2:?after build}")
mode=${MODE:-a}
reps=${REPS:-6}
dur=${DURATION:-5}
case $mode in
    a) args=(-c 64 -z "${dur}s") ;;
    c) args=(-c 16 --disable-keepalive -z "${dur}s") ;;
    d) args=(-c 1 --http2 -p 100 -z "${dur}s") ;;
    *) echo "MODE is a, c or d" >&2; exit 2 ;;
esac
listen_h2=http2
[ "${UPSTREAM_H2:-1}" = 0 ] && listen_h2=
port_a=$(free_port); port_b=$(free_port)
stage "$A" "$port_a" $listen_h2
sed "s/^listen: .*/listen: 127.0.0.1:$port_b/" config.yaml > config-b.yaml
[ -n "${B_EXTRA:-}" ] && printf '%s\n' "$B_EXTRA" >> config-b.yaml
RUST_LOG=warn "$A" run --config config.yaml >proxy-a.log 2>&1 &
pid_a=$!; pids+=($pid_a)
RUST_LOG=warn "$B" run --config config-b.yaml >proxy-b.log 2>&1 &
pid_b=$!; pids+=($pid_b)
wait_port "$port_a"; wait_port "$port_b"
url="https://$host/storage/v1/b/bench-bucket/o/object.bin"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
load() { # PID PORT
    local t0 t1 ok
    t0=$(ticks "$1")
    oha --no-tui --output-format json "${args[@]}" -x "http://127.0.0.1:$2" --cacert "$work/ca.pem" \
        -t 60s "$url" > oha.json
    t1=$(ticks "$1")
    ok=$(python3 -c 'import json; print(json.load(open("oha.json"))["statusCodeDistribution"].get("200", 0))')
    python3 -c "import os; hz = os.sysconf('SC_CLK_TCK'); print(f'{($t1 - $t0) * 1e6 / hz / max($ok, 1):7.1f} us/req  {$ok / $dur:8.0f} req/s')"
}
for port in "$port_a" "$port_b"; do
    oha --no-tui -z 2s -c 64 -x "http://127.0.0.1:$port" --cacert "$work/ca.pem" "$url" >/dev/null
done
for _ in $(seq "$reps"); do
    echo "A $(load "$pid_a" "$port_a")"
    echo "B $(load "$pid_b" "$port_b")"
done

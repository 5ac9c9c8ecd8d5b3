#!/usr/bin/env bash
# Who uses the machine during a load: the CPU of oha, of nginx and of each of the proxy's
# threads, and the proxy's context switches, per request. The shared harness (../shared/bench)
# reports the proxy's CPU only; this says whether a test is held by a core (one thread near
# 1.00), by the machine (near 2.00 of 2 cores) or by neither (a round trip).
#
#   MODE=a|c|d UPSTREAM_H2=0|1 [DIRECT=1] bash benches/cpu-split.sh [BIN]
#
# The harness's set-up on a small scale (benches/lib/setup.sh): Debian's nginx with one worker
# as the origin, one emulator, the proxy (default: the release build). oha runs test (a) (64
# keep-alive clients), (c) (16 clients, a new connection per request) or (d) (one h2
# connection, 100 streams) for 6 s, through the proxy or with DIRECT=1 straight to nginx; CPU
# and switches are read from /proc over the middle 3 s, and divided by the rate of 200s over the
# whole run. Needs oha, nginx, openssl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib/setup.sh
needs oha nginx openssl python3
bin=$(proxy_bin "${1:-}")
case ${MODE:-d} in
    a) args=(-c 64) ;;
    c) args=(-c 16 --disable-keepalive) ;;
    d) args=(-c 1 --http2 -p 100) ;;
    *) echo "MODE is a, c or d" >&2; exit 2 ;;
esac
listen_h2=http2
[ "${UPSTREAM_H2:-1}" = 0 ] && listen_h2=
proxy_port=$(free_port)
stage "$bin" "$proxy_port" $listen_h2
RUST_LOG=warn "$bin" run --config config.yaml >proxy.log 2>&1 &
proxy=$!
pids+=($proxy)
wait_port "$proxy_port"
if [ "${DIRECT:-0}" = 1 ]; then
    url="https://$host:$origin_port/storage/v1/b/bench-bucket/o/object.bin"
    via=(--cacert "$work/origin-ca.pem")
else
    url="https://$host/storage/v1/b/bench-bucket/o/object.bin"
    via=(-x "http://127.0.0.1:$proxy_port" --cacert "$work/ca.pem")
fi
oha --no-tui -z 2s "${args[@]}" "${via[@]}" "$url" >/dev/null
oha --no-tui --output-format json -z 6s "${args[@]}" "${via[@]}" "$url" >oha.json &
load=$!
sleep 1.5
nginx_worker=$(pgrep -P "$(cat "$work/nginx-nginx.pid")" | head -1)
# One line a thread: name, CPU ticks, voluntary and involuntary switches.
snapshot() {
    local t
    for t in /proc/"$load"/task/* /proc/"$nginx_worker"/task/* /proc/"$proxy"/task/*; do
        printf '%s %s %s %s\n' "${t#/proc/}" "$(tr ' ' _ <"$t/comm")" \
            "$(awk '{print $14 + $15}' "$t/stat")" \
            "$(awk '/^voluntary_ctxt/{v=$2} /^nonvoluntary_ctxt/{n=$2} END{print v, n}' "$t/status")"
    done
    awk '/^cpu /{print "machine machine", $2 + $3 + $4 + $7 + $8, 0, 0}' /proc/stat
}
snapshot >before
sleep 3
snapshot >after
wait "$load"
python3 - "$load" "$nginx_worker" "$proxy" "$(getconf CLK_TCK)" <<'EOF'
import json, sys
load, nginx, proxy, hz = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# Answered requests (200s, as ab-cpu.sh counts them) over oha's whole run: the rate the
# middle 3 s ran at, give or take the run's ramp.
report = json.load(open("oha.json"))
ok = report["statusCodeDistribution"].get("200", 0)
if ok == 0:
    sys.exit("no request was answered with 200; see proxy.log")
rps = ok / report["summary"]["total"]
def read(path):
    return {k: (name, int(t), int(v), int(n))
            for k, name, t, v, n in (line.split() for line in open(path))}
a, b = read("before"), read("after")
owner = {load: "oha", nginx: "nginx", proxy: "proxy", "machine": "machine"}
cores, switches, threads = {}, [0, 0], []
for key, (name, t, v, n) in b.items():
    if key not in a:
        continue
    who = owner[key.split("/")[0]]
    core = (t - a[key][1]) / hz / 3
    cores[who] = cores.get(who, 0) + core
    if who == "proxy":
        switches[0] += v - a[key][2]
        switches[1] += n - a[key][3]
        if core > 0.005:
            threads.append(f"{name} {core:.2f}")
requests = rps * 3
print(f"{rps:,.0f} requests a second")
for who in ("oha", "nginx", "proxy", "machine"):
    if who in cores:
        print(f"{who:8} {cores[who]:5.2f} cores  {1e6 * cores[who] / rps:7.1f} µs a request")
print("proxy threads: " + (", ".join(threads) or "idle"))
print(f"proxy context switches a request: {switches[0] / requests:.3f} voluntary, "
      f"{switches[1] / requests:.3f} involuntary")
EOF

#!/usr/bin/env bash
# Instructions the proxy executes per intercepted h2 request, counted by valgrind's callgrind.
#
#   bash benches/instructions.sh [PROXY_BIN]     # default: target/release/impersonate-proxy
#
# Wall-clock figures on a shared machine swing by a third from run to run; instruction counts do
# not depend on what else the machine is doing, so two builds can be compared one after the
# other. The load tool's h2 mode drives the proxy (run under callgrind, so slowly); counting is
# switched on for 4 s in the middle of the phase through the proxy, and the total is divided by
# the calls of the route lookup, which runs once per intercepted request. Under callgrind the
# proxy sees bigger batches than at full speed, so per-request kernel and wake-up costs are not
# in this figure: it measures the proxy's own user-space work.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
bin=$(realpath "${1:-target/release/impersonate-proxy}")
[ -x "$bin" ] || { echo "no proxy binary at $bin (cargo build --release)" >&2; exit 2; }
load=$(cargo bench --bench load --no-run 2>&1 | grep -o 'target/release/deps/load-[0-9a-f]*' | tail -1)
[ -n "$load" ] || { echo "cannot build the load tool" >&2; exit 2; }

work=$(mktemp -d)
bench_pid=
cleanup() {
    [ -n "$bench_pid" ] && kill "$bench_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cat >"$work/proxy" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$work/cg.%p "$bin" "\$@" 2>"$work/valgrind.log"
EOF
chmod +x "$work/proxy"

LOAD_SECS=8 LOAD_ROUNDS=1 LOAD_MODES=h2 LOAD_PROXY_BIN="$work/proxy" "$load" --bench >"$work/load.out" 2>&1 &
bench_pid=$!
# The header is printed after the warm-up; then come 8 s direct and 8 s through the proxy.
for _ in $(seq 1200); do grep -q '^load:' "$work/load.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^load:' "$work/load.out" || { cat "$work/load.out" >&2; exit 1; }
proxy_pid=$(pgrep -P "$bench_pid" | head -1)
sleep 10
callgrind_control -i on "$proxy_pid" >/dev/null 2>&1
sleep 1
callgrind_control -z "$proxy_pid" >/dev/null 2>&1
sleep 4
callgrind_control -d "$proxy_pid" >/dev/null 2>&1
callgrind_control -i off "$proxy_pid" >/dev/null 2>&1
wait "$bench_pid"
bench_pid=

out=$(ls "$work"/cg.*.1)
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
requests=$(callgrind_annotate --tree=calling "$out" 2>/dev/null |
    grep -oE '=> [^ ]*routes\.rs:impersonate_proxy::routes::RouteTable::find \([0-9,]+x\)' |
    grep -oE '[0-9,]+x' | tr -d ,x | awk '{s += $1} END {print s + 0}')
[ "${requests:-0}" -gt 0 ] || { echo "no intercepted request was counted" >&2; exit 1; }
echo "proxy: $bin"
echo "instructions: $total over $requests intercepted h2 requests = $((total / requests)) per request"

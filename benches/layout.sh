#!/usr/bin/env bash
# Write the link order of the release binary's functions (src/link-order.txt, used by build.rs).
#
#   bash benches/layout.sh [PROXY_BIN]      # default: target/release/impersonate-proxy
#
# Why: a process's code is resident page by page, and the kernel maps a file's pages 64 KiB at a
# time around each one touched (fault-around, when they are in the page cache, as they are for a
# binary that runs). The functions the proxy and its emulator run are spread over the whole
# 9.7 MB of code, so each process had 6.5 – 9 MB of it resident (/proc/PID/smaps) though it runs
# a fraction. Linked first and side by side, they take a few windows instead of nearly all.
#
# How: the shared harness's set-up on a small scale (Debian's nginx as the origin, one with h2
# and one with HTTP/1.1 only, tokens from the proxy's own emulator), the proxy and the emulator
# run under valgrind's callgrind from their first instruction to their exit, through the
# harness's four tests (keep-alive, one connection, a new connection per request, h2 with 100
# streams), a plain curl, and a clean stop. Every function of the binary that ran is written,
# the busiest first (callgrind's own instructions), so the load's code comes first and is
# densest; the rest of the binary follows in the linker's order. Run it again when the request
# path changes much: a function missing from the list still works, it is only placed later.
# Needs valgrind, oha, nginx, openssl, curl and python3.
# Run it on a fresh `cargo build --release`: `cargo bench` writes target/release/impersonate-proxy
# too, under the bench profile, whose symbol names carry other hashes; a list written from that
# binary matched 1,258 of its 2,885 names in the release build that followed, and the code the
# processes ran was spread over the whole binary again.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib/setup.sh
needs valgrind oha nginx openssl curl python3
bin=$(proxy_bin "${1:-}")
out=$(pwd)/src/link-order.txt

h2host=storage.googleapis.com
# oha looks a URL's name up even when it goes through a proxy, so the second origin's name is
# one that resolves anywhere; the proxy sends it to the nginx without h2 all the same.
h1host=localhost
h2_port=$(free_port); h1_port=$(free_port); emu_port=$(free_port); proxy_port=$(free_port)

origin_certs "$h2host" "$h1host"
origin h2 "$h2_port" http2
origin h1 "$h1_port"
proxy_files "$emu_port" "$proxy_port" "$h2host=$h2_port" "$h1host=$h1_port"
cd "$work"
"$bin" ca init --config config.yaml --force >/dev/null
through=(-x "http://127.0.0.1:$proxy_port" --cacert "$work/ca.pem" -t 60s)
load() { # oha's arguments; every request must be answered 200
    oha --no-tui "${through[@]}" "$@" >oha.txt
    local codes; codes=$(sed -nE 's/^ +\[([0-9]{3})\] [0-9]+ responses$/\1/p' oha.txt | sort -u)
    [ "$codes" = 200 ] && ! grep -q 'Error distribution' oha.txt \
        || { echo "oha $*: not every answer was 200" >&2; cat oha.txt >&2; exit 1; }
}
# The harness's tests, on each origin, and a clean stop. $1 is what runs each process (callgrind
# or perf), $2 the suffix of its output files, $3 how many requests a test makes.
pass() {
    local run=$1 out=$2 n=$3
    $run "$work/emulator.$out" "$bin" emulator --policy policy.yaml \
        --listen "127.0.0.1:$emu_port" >emulator.log 2>&1 &
    local emu=$!
    pids+=($emu)
    wait_port "$emu_port" || { cat emulator.log >&2; exit 1; }
    RUST_LOG=warn $run "$work/proxy.$out" "$bin" run --config config.yaml >proxy.log 2>&1 &
    local proxy=$!
    pids+=($proxy)
    wait_port "$proxy_port" || { cat proxy.log >&2; exit 1; }
    for host in $h2host $h1host; do
        url="https://$host/storage/v1/b/layout-bucket/o/object.bin"
        curl -sSf --proxy "http://127.0.0.1:$proxy_port" --cacert ca.pem "$url" >/dev/null
        load -n $((n * 3)) -c 64 "$url"
        load -n "$n" -c 1 "$url"
        load -n $((n / 3)) -c 16 --disable-keepalive "$url"
    done
    load -n $((n * 5)) -c 1 --http2 -p 100 "https://$h2host/storage/v1/b/layout-bucket/o/object.bin"
    # Each tool writes its output as its process exits: stop the processes (the job's child, or
    # the job itself where the shell ran the tool in its place), then wait for the tools.
    local p
    for p in "$proxy" "$emu"; do
        pkill -TERM -P "$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
    done
    wait "$proxy" "$emu" 2>/dev/null || true
}

# 1. callgrind: every function that ran, and how much.
grind() { valgrind --tool=callgrind --demangle=no --dump-instr=no --compress-strings=no \
    --compress-pos=no --callgrind-out-file="$1" "${@:2}"; }
pass grind cg 1000
[ -s proxy.cg ] && [ -s emulator.cg ] || { echo "callgrind wrote nothing" >&2; cat proxy.log >&2; exit 1; }

# 2. At full speed, what valgrind does not show: code for CPU features it lacks (AVX-512) and
# paths that only timing takes. Each page fault in the code names a function that ran there;
# a function the list lacks is added. A binary linked with an older list shows more.
if command -v perf >/dev/null && perf record -q -e page-faults -o /dev/null true 2>/dev/null; then
    faults() { perf record -q -e page-faults -c 1 -d -o "$1.data" -- "${@:2}"; }
    pass faults pf 10000
    for p in proxy emulator; do
        perf script -i "$p.pf.data" --no-demangle -F addr,sym 2>/dev/null > "$p.pf" || true
    done
else
    echo "no perf here: the list has what callgrind saw" >&2
    : > proxy.pf; : > emulator.pf
fi

python3 - "$bin" "$out" <<'EOF'
import collections, re, subprocess, sys
binary, out = sys.argv[1:]

def functions(path):
    """Instructions each of the binary's functions ran (its own, not its callees')."""
    cost = collections.Counter()
    ours = skip = False
    fn = None
    for line in open(path, errors="replace"):
        if line.startswith("ob="):
            ours = line[3:].strip() == binary
        elif line.startswith("fn="):
            # callgrind tells a function's recursion levels apart with 'N; the symbol is one
            fn = re.sub(r"'\d+$", "", line[3:].strip()) if ours else None
            if fn is not None and not fn.startswith("0x"):
                cost[fn] += 0
        elif line.startswith("calls="):
            skip = True  # the next line is the call's inclusive cost, not this function's
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
            elif fn in cost:
                parts = line.split()
                if len(parts) > 1 and parts[1].isdigit():
                    cost[fn] += int(parts[1])
    return cost

nm = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True).stdout
code = {l.split()[2] for l in nm.splitlines() if len(l.split()) == 3 and l.split()[1] in "tTwW"}

def faulted(path):
    """The binary's functions whose code took a page fault, in the order of the faults."""
    seen = {}
    for line in open(path, errors="replace"):
        parts = line.split()
        if len(parts) > 1 and parts[1] in code:
            seen.setdefault(parts[1], None)
    return list(seen)

p, e = functions("proxy.cg"), functions("emulator.cg")
both = p.keys() & e.keys()
def busiest(names, cost):
    return sorted(names, key=lambda f: (-cost[f], f))
# What both processes run, then the proxy's own, then the emulator's: each process's code is
# then one run of pages, the emulator's with a gap where the proxy's own lies. What only the
# page faults showed ends each process's part.
names = busiest(both, p + e) + busiest(p.keys() - both, p)
names += [f for f in faulted("proxy.pf") if f not in p and f not in e]
names += busiest(e.keys() - both, e)
names += [f for f in faulted("emulator.pf") if f not in names]
with open(out, "w") as f:
    f.write("\n".join(names) + "\n")
print(f"{len(names)} functions written to {out}: {len(both)} that both run, "
      f"{len(p) - len(both)} the proxy's own, {len(e) - len(both)} the emulator's, "
      f"{len(names) - len(p.keys() | e.keys())} more from page faults")
EOF

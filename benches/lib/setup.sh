# The shared harness's set-up on a small scale, for the scripts in benches/ (sourced, not run):
# a work directory removed on exit with every process started, Debian's nginx as an origin with a
# certificate from a CA of its own, and the emulator's policy with a source credential for it.

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for f in "$work"/nginx-*.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    sleep 0.2
    rm -rf "$work"
}
trap cleanup EXIT

# needs COMMAND...: exit 2 naming the first one this machine lacks.
needs() {
    local c
    for c in "$@"; do command -v "$c" >/dev/null || { echo "$c is needed" >&2; exit 2; }; done
}

# proxy_bin [PATH]: the binary to measure, absolute (default: the release build).
proxy_bin() {
    local bin
    bin=$(realpath "${1:-target/release/impersonate-proxy}")
    [ -x "$bin" ] || { echo "no proxy binary at $bin (cargo build --release)" >&2; exit 2; }
    echo "$bin"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# origin_certs NAME...: origin-ca.pem, and origin.pem / origin.key for the names, in $work.
origin_certs() {
    (
        cd "$work"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj /CN=bench-origin-ca -keyout origin-ca.key -out origin-ca.pem 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
            -keyout origin.key -out origin.csr 2>/dev/null
        local sans
        sans=$(printf 'DNS:%s,' "$@")
        printf 'subjectAltName=%s\n' "${sans%,}" > origin.ext
        openssl x509 -req -in origin.csr -CA origin-ca.pem -CAkey origin-ca.key -CAcreateserial \
            -days 2 -extfile origin.ext -out origin.pem 2>/dev/null
    )
}

# origin NAME PORT [http2]: an nginx on 127.0.0.1:PORT answering every GET with a small JSON
# object, as the shared harness's does; h2 too when the third argument is `http2`.
origin() {
    cat > "$work/nginx-$1.conf" <<EOF
worker_processes 1;
pid $work/nginx-$1.pid;
error_log $work/nginx-$1-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
    uwsgi_temp_path $work; scgi_temp_path $work;
    keepalive_requests 10000000;
    server {
        listen 127.0.0.1:$2 ssl ${3:-};
        ssl_certificate $work/origin.pem;
        ssl_certificate_key $work/origin.key;
        location / { return 200 "{\"kind\":\"storage#object\",\"name\":\"object.bin\"}\n"; }
    }
}
EOF
    nginx -e "$work/nginx-$1-error.log" -c "$work/nginx-$1.conf"
    wait_port "$2"
}

# proxy_files EMU_PORT PROXY_PORT HOST=ORIGIN_PORT...: in $work, the emulator's policy.yaml and
# adc.json (a user's refresh token it takes, allowed to impersonate one service account), and
# config.yaml: the proxy on PROXY_PORT, tokens from the emulator on EMU_PORT, one route per
# HOST, each sent to the nginx on its ORIGIN_PORT and trusted through origin-ca.pem.
proxy_files() {
    local emu=$1 listen=$2 account=bench@bench-project.iam.gserviceaccount.com
    shift 2
    cat > "$work/policy.yaml" <<EOF
users:
  - { email: bench@example.com, client_id: bench-client, client_secret: bench-secret, refresh_token: bench-refresh }
service_accounts:
  - { email: $account, token_creators: ["user:bench@example.com"] }
EOF
    printf '{"type":"authorized_user","client_id":"bench-client","client_secret":"bench-secret","refresh_token":"bench-refresh","token_uri":"http://127.0.0.1:%s/token"}\n' "$emu" > "$work/adc.json"
    local routes="" resolve="" origin
    for origin in "$@"; do
        routes+="  - { name: ${origin%%=*}, host: ${origin%%=*}, identity: bench }"$'\n'
        resolve+="\"${origin%%=*}:443\": \"127.0.0.1:${origin#*=}\", "
    done
    cat > "$work/config.yaml" <<EOF
listen: 127.0.0.1:$listen
admin: null
ca: { cert: "$work/ca.pem", key: "$work/ca-key.pem" }
source: { file: "$work/adc.json" }
iam: { endpoint: "http://127.0.0.1:$emu" }
identities:
  bench: { service_account: $account }
routes:
${routes}other_hosts: deny
upstream:
  system_roots: false
  extra_roots: ["$work/origin-ca.pem"]
  resolve: { ${resolve%, } }
EOF
}

# stage BIN PROXY_PORT [http2]: the set-up the scripts here share. In $work: nginx for
# storage.googleapis.com ($host) on a port of its own ($origin_port; h2 too with `http2`), the
# proxy's files routing the host there with a proxy on PROXY_PORT, the proxy's CA (ca.pem), and
# the emulator running. Leaves the shell in $work.
stage() {
    local bin=$1 listen=$2 emu_port
    host=storage.googleapis.com
    origin_port=$(free_port)
    emu_port=$(free_port)
    origin_certs "$host"
    origin nginx "$origin_port" ${3:-}
    proxy_files "$emu_port" "$listen" "$host=$origin_port"
    cd "$work"
    "$bin" ca init --config config.yaml --force >/dev/null
    "$bin" emulator --policy policy.yaml --listen "127.0.0.1:$emu_port" >emulator.log 2>&1 &
    pids+=($!)
    wait_port "$emu_port"
}

#!/usr/bin/env bash
# The quick-start demo: a throwaway Prosody on loopback with demo users, `stanzaguard run` in
# front of it, messages sent through it by a real client (go-sendxmpp), then the archive.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=$root/.demo
keep=${KEEP:-0}
prosody_port=15322
listen_port=15222
listen_tls_port=15223

bash scripts/install-deps.sh prosody go-sendxmpp openssl python3-venv make gcc libc6-dev python3-dev
make -s venv native

rm -rf "$demo"
mkdir -p "$demo/prosody/data" "$demo/prosody/certs"
.venv/bin/stanzaguard dev-cert localhost --out "$demo" >/dev/null
cp "$demo/localhost.crt" "$demo/localhost.key" "$demo/prosody/"
cat > "$demo/prosody/prosody.cfg.lua" <<CFG
pidfile = "$demo/prosody/prosody.pid"
data_path = "$demo/prosody/data"
daemonize = false
c2s_ports = { $prosody_port }
c2s_interfaces = { "127.0.0.1" }
s2s_ports = { }
component_ports = { }
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
network_settings = { nagle = false }
limits = { c2s = { rate = "100mb/s" } }
log = { info = "$demo/prosody/prosody.log" }
modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "offline"; "carbons"; "smacks"; "blocklist"; "mam" }
VirtualHost "localhost"
  ssl = { certificate = "$demo/prosody/localhost.crt"; key = "$demo/prosody/localhost.key" }
CFG
chown -R prosody: "$demo/prosody"
for user in alice bob; do
  runuser -u prosody -- prosodyctl --config "$demo/prosody/prosody.cfg.lua" register "$user" localhost demo-password
done

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

runuser -u prosody -- prosody --config "$demo/prosody/prosody.cfg.lua" -F >"$demo/prosody/stdout.log" 2>&1 &
pids+=($!)
wait_port() {  # PORT WHAT: wait up to 30 s for a listener
  .venv/bin/python - "$1" "$2" <<'PY'
import socket, sys, time
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(f"{sys.argv[2]} did not start")
PY
}
wait_port "$prosody_port" prosody

cat > "$demo/policy.toml" <<POLICY
version = 1

[federation]
mode = "deny"
domains = ["evil.example", "*.evil.example"]
POLICY

STANZAGUARD_LOG_FORMAT=text .venv/bin/stanzaguard run --policy "$demo/policy.toml" \
  --domain localhost --upstream "127.0.0.1:$prosody_port" \
  --cert "$demo/localhost.crt" --key "$demo/localhost.key" \
  --listen "127.0.0.1:$listen_port" --listen-tls "127.0.0.1:$listen_tls_port" \
  --data-dir "$demo/data" --environment development >"$demo/stanzaguard.log" 2>&1 &
pids+=($!)
wait_port "$listen_port" "stanzaguard run (see $demo/stanzaguard.log)"

echo "== go-sendxmpp → stanzaguard (STARTTLS :$listen_port) → Prosody :$prosody_port"
echo "Quarterly numbers are in the shared folder." |
  go-sendxmpp -u alice@localhost -p demo-password -j "127.0.0.1:$listen_port" -n bob@localhost
echo "== go-sendxmpp → stanzaguard (direct TLS :$listen_tls_port)"
echo "Lunch at noon?" |
  go-sendxmpp -u alice@localhost -p demo-password -j "127.0.0.1:$listen_tls_port" -t -n bob@localhost
echo "== go-sendxmpp → mallory@evil.example (a denied domain: bounced by the proxy, never reaches Prosody)"
echo "Send me the client list." |
  go-sendxmpp -u alice@localhost -p demo-password -j "127.0.0.1:$listen_port" -n mallory@evil.example || true
sleep 1

echo "== bob's offline store in Prosody (delivered through the proxy):"
grep -ho 'Quarterly numbers are in the shared folder\.\|Lunch at noon?' -r "$demo/prosody/data/localhost/offline" || echo "(none)"
echo "== the archive: every message alice sent (stanzaguard search 'from:alice@localhost type:chat'):"
.venv/bin/stanzaguard search --data-dir "$demo/data" "from:alice@localhost type:chat"
echo "== what policy stopped (stanzaguard search 'verdict:reject'):"
.venv/bin/stanzaguard search --data-dir "$demo/data" "verdict:reject"
echo "== tamper evidence (stanzaguard verify):"
.venv/bin/stanzaguard verify --data-dir "$demo/data"
echo "== proxy log: $demo/stanzaguard.log"
if [ "$keep" = 1 ]; then
  echo "Running; connect a client to 127.0.0.1:$listen_port (users alice, bob / demo-password). Ctrl-C stops."
  wait
fi

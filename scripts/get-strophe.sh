#!/usr/bin/env bash
# Fetch strophe.js (the JavaScript XMPP library the web-client browser tests run) from the npm
# registry into a cache directory, and print the path of its browser build.
#
#   scripts/get-strophe.sh                   print the path (fetching it if needed)
#   STROPHE_CACHE_DIR=DIR scripts/get-strophe.sh   cache somewhere else
#
# The cache, ${XDG_CACHE_HOME:-~/.cache}/stanzaguard/strophe/VERSION, is outside the work tree
# (like scripts/get-helm.sh): third-party JavaScript is never committed. The version and its npm
# integrity hash are pinned, so a changed tarball is refused rather than run in the browser.
# `npm pack` fetches the tarball; python3 checks and unpacks the one file needed (the UMD
# build, which defines `window.Strophe`). Exit 0 with the path on stdout, 1 with the reason.
set -euo pipefail

PACKAGE="strophe.js"
VERSION="5.0.0"
INTEGRITY="sha512-RNcmYrgEfZsTvl4uD4rU+eQydWAR5Z0a4c3rfxO/7Uh9Qxxla3la3ldOx7qHBGtdJ4ttCJRou+KEw3guT3fVVg=="
MEMBER="package/dist/strophe.umd.min.js"

cache="${STROPHE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stanzaguard/strophe}/${VERSION}"
script="$cache/strophe.umd.min.js"

if [ -s "$script" ]; then
  echo "$script"
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "get-strophe: npm is needed (scripts/install-deps.sh)" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "get-strophe: python3 is needed to unpack" >&2; exit 1; }

mkdir -p "$cache"
work="$(mktemp -d "$cache/fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "${PACKAGE}@${VERSION}" >/dev/null 2>&1) || {
  echo "get-strophe: npm pack ${PACKAGE}@${VERSION} failed" >&2
  exit 1
}
tarball="$(find "$work" -maxdepth 1 -name '*.tgz' -print -quit)"
[ -n "$tarball" ] || { echo "get-strophe: npm pack left no tarball" >&2; exit 1; }

python3 - "$tarball" "$INTEGRITY" "$MEMBER" "$work/strophe.umd.min.js" <<'PY'
import base64
import hashlib
import sys
import tarfile

tarball, integrity, member, out = sys.argv[1:5]
data = open(tarball, "rb").read()
algorithm, _, expected = integrity.partition("-")
actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
if actual != expected:
    sys.exit(f"get-strophe: integrity mismatch for the npm tarball ({algorithm} {actual})")
with tarfile.open(tarball, mode="r:gz") as tar:
    extracted = tar.extractfile(member)
    if extracted is None:
        sys.exit(f"get-strophe: {member} not in the tarball")
    with open(out, "wb") as target:
        target.write(extracted.read())
PY
mv -f "$work/strophe.umd.min.js" "$script"
echo "$script"

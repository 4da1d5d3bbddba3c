#!/bin/sh
# Screenshot an `edgelearn report` page in headless chromium (Debian: apt-get install chromium)
# to check by eye how it renders.
#   benchmarks/screenshot_report.sh REPORT.html [OUT.png]   (default OUT: /tmp/report.png)
set -eu
html=$(realpath "$1")
png=${2:-/tmp/report.png}
exe=$(command -v chromium || command -v chromium-browser || true)
[ -n "$exe" ] || { echo "chromium is not installed (apt-get install chromium)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$exe" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --screenshot="$png" --window-size=1200,1600 \
    "file://$html" 2>/dev/null
echo "$png"

#!/usr/bin/env bash
# Render an HTML page (the study report of `python -m experiments.report`) to a PNG with headless
# Chromium, to look at what a reader sees.
#
#   scripts/report_screenshot.sh REPORT.html OUT.png [WIDTH [HEIGHT]]
#
# WIDTH × HEIGHT is the browser window in pixels (default 1400 × 5000: the top of a long page).
# The browser is $CHROMIUM, else the first of chromium, chromium-browser, google-chrome on the PATH
# (Debian: apt-get install chromium). Exit 2 on bad arguments or no browser, 1 if no PNG came out.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 4 ]]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH [HEIGHT]]" >&2
    exit 2
fi
page=$1 out=$2 width=${3:-1400} height=${4:-5000}
if [[ ! -f $page ]]; then
    echo "error: no such page: $page" >&2
    exit 2
fi
browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
    for name in chromium chromium-browser google-chrome; do
        if command -v "$name" >/dev/null; then browser=$(command -v "$name"); break; fi
    done
fi
if [[ -z $browser ]]; then
    echo "error: no Chromium found (install Debian's chromium package, or set CHROMIUM)" >&2
    exit 2
fi
page_url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
rm -f "$out_abs"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: Chromium refuses to start as root with its sandbox; the page is a local file.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
    --window-size="$width,$height" --screenshot="$out_abs" "$page_url" >/dev/null 2>&1 || true
if [[ ! -s $out_abs ]]; then
    echo "error: $browser wrote no screenshot of $page" >&2
    exit 1
fi
echo "$out_abs"

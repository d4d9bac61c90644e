#!/usr/bin/env bash
# Installs what attn's build needs and is missing: CMake, a C++17 compiler, Eigen 3.4 and
# Catch2. Extra Debian packages may be named as arguments:
#
#   scripts/deps.sh                          # cmake g++ libeigen3-dev catch2
#   scripts/deps.sh clang libbenchmark-dev   # ... and these too
#
# Idempotent, and silent when nothing is missing. On Debian and Ubuntu it installs with
# apt-get (as root, else through sudo); elsewhere it says what to install.
set -euo pipefail

default_packages=(cmake g++ libeigen3-dev catch2)

say() { printf 'deps.sh: %s\n' "$*" >&2; }

if [[ ! -f /etc/debian_version ]]; then
  say "not a Debian or Ubuntu system; install these with your package manager:"
  say "  CMake >= 3.20 (3.25 for 'cmake --workflow'), a C++17 compiler (g++ >= 8 or clang++ >= 7),"
  say "  Eigen 3.4, Catch2 v2.13 or v3, and optionally Google Benchmark${*:+ (also asked for: $*)}"
  if command -v cmake >/dev/null 2>&1; then
    exit 0
  fi
  say "cmake is not on PATH"
  exit 1
fi

# The packages asked for, once each, in order.
declare -A seen=()
missing=()
for package in "${default_packages[@]}" "$@"; do
  [[ -n "${seen[$package]:-}" ]] && continue
  seen[$package]=1
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
  as_root=(env DEBIAN_FRONTEND=noninteractive)
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo env DEBIAN_FRONTEND=noninteractive)
else
  say "missing: ${missing[*]}; as root, run:"
  say "  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
  exit 1
fi

install_missing() {
  "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" 2>&1 | tee "$log"
}

say "installing: ${missing[*]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! install_missing; then
  # A fresh machine or container has no package lists (or stale ones that 404): fetch
  # them once and try again. Any other failure is real.
  if grep -Eq "Unable to locate package|has no installation candidate|Failed to fetch|404 +Not Found" "$log"; then
    say "package lists missing or stale; running apt-get update"
    "${as_root[@]}" apt-get update -q
    install_missing
  else
    say "apt-get install failed"
    exit 1
  fi
fi

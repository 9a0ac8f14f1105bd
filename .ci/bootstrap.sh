#!/usr/bin/env bash
# Installs what linkfix needs on a fresh Debian machine, skipping what is there:
# QEMU, 32-bit gcc support, clang and lld from Debian, Python packages in ./.venv.
# With --bench, also what the benchmarks need (valgrind, GNU time).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
command -v qemu-system-i386 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
# -m32 links and hosted 32-bit programs need the multilib runtime.
[ -e /usr/lib/gcc/x86_64-linux-gnu/12/32/libgcc.a ] || \
  ls /usr/lib/gcc/x86_64-linux-gnu/*/32/libgcc.a >/dev/null 2>&1 || need_apt+=(gcc-multilib)
# clang and lld: tests build gen-stubs output with clang's integrated assembler too.
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
command -v ld.lld >/dev/null 2>&1 || need_apt+=(lld)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# --bench: what bench/run.py needs besides (exact instruction counts, peak memory).
if [ "${1:-}" = "--bench" ]; then
  command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind)
  [ -x /usr/bin/time ] || need_apt+=(time)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  echo "bootstrap: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  python3 -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.linkfix-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,bench]'
  touch "$stamp"
fi

#!/usr/bin/env bash
# Build Debian's linux-source-6.1 in configs B and C out of tree, capture the objtool
# warnings, and boot each bzImage under QEMU with a busybox initramfs.
# Incremental: the unpacked tree and the build trees are cached (see README.md).
#
#   integrations/linux/build.sh                       # deps, unpack, B and C: build + boot
#   integrations/linux/build.sh build --configs B     # one step, one config
#   integrations/linux/build.sh --help
#   integrations/linux/build.sh linkfix [--configs B]  # the series: build, check, boot
#                                                       # every target (lfbuild.py)
#
# The work is done by kbuild.py (Python 3 standard library only); every argument is
# passed on to it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if ! command -v python3 >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
fi
if [ "${1:-}" = linkfix ]; then
    shift
    exec python3 "$here/lfbuild.py" "$@"
fi
exec python3 "$here/kbuild.py" "$@"

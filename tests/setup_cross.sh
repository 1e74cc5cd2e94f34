#!/usr/bin/env bash
# System packages for cross-compiling mlci's builds for 64-bit Arm Linux and running them under
# user-mode emulation (tests/test_emulation.py, mlci.emulation): qemu-user, the aarch64 C/C++
# cross toolchain (its sysroot /usr/aarch64-linux-gnu holds the aarch64 libc and libstdc++ qemu
# loads) and `file`. Idempotent: when every command is already there it runs nothing.
set -euo pipefail

need=()
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v file >/dev/null 2>&1 || need+=(file)

if [ ${#need[@]} -eq 0 ]; then
    echo "setup_cross: qemu-aarch64 and the aarch64 cross toolchain are installed"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
echo "setup_cross: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq -o Acquire::http::Timeout=60 -o Acquire::Retries=3
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends -o Acquire::http::Timeout=60 -o Acquire::Retries=3 "${need[@]}"

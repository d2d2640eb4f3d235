#!/usr/bin/env bash
# Installs what rnnserve needs to build, test and serve, from Debian 12's
# packages. Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config
  protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev
  libabsl-dev nlohmann-json3-dev libdnnl-dev libopenblas-dev
  # Debian's oneDNN is built with its OpenCL runtime, and its CMake package
  # looks for OpenCL's library and headers even on a CPU-only build.
  ocl-icd-opencl-dev
  libgtest-dev libgmock-dev
  # The PyTorch reference for parity tests, the exporter and the example
  # training scripts.
  python3 python3-numpy python3-torch
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
      grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "installing: ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
  "${missing[@]}"

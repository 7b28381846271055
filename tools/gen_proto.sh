#!/usr/bin/env bash
# Regenerates the Python gRPC stubs of serving/proto/generation.proto (run after editing it).
# Compiles from the repository root so the generated modules import as `serving.proto.*`.
# Generate with grpcio-tools 1.84.0 (the dev extra pins it): stubs refuse a grpcio runtime older
# than the tools that made them, and 1.84.0 is the oldest grpcio jaxserve supports.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
  serving/proto/generation.proto

#!/usr/bin/env bash
# The project's test command (README: "Run the tests").
#
# 1. fetches the pinned test assets (models, ONNX backend tests, ONNX Runtime references),
#    cached under assets/ — a no-op when already present;
# 2. runs every Rust test in release mode (the real-model tests are slow unoptimised);
# 3. runs the ONNX conformance suite and fails if a case listed in
#    tests/conformance/expected_pass.txt stops passing.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
echo "== fetching test assets"
python3 scripts/assets.py all
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --release --all-targets -- -D warnings
echo "== cargo build"
# Builds every artifact the tests use (libkiln.so for the C API tests, the kiln binary).
cargo build --workspace --release
echo "== cargo test"
cargo test --workspace --release
if [ -f tests/conformance/expected_pass.txt ]; then
  echo "== ONNX conformance"
  cargo run --release -q -p kiln-conformance -- --check
fi
echo "== all tests passed in $(( $(date +%s) - start )) s"

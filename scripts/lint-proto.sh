#!/usr/bin/env bash
# Lints proto/ with buf (STANDARD + COMMENTS, see buf.yaml) and checks buf formatting.
#
# buf is the npm package @bufbuild/buf, pinned, installed into .tools/ when missing.
# Runs offline: google/rpc/*.proto is copied from the installed
# googleapis-common-protos into .tools/googleapis, a buf module resolved against only.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION="1.75.0"
BUF=".tools/node_modules/.bin/buf"
PYTHON="${PYTHON:-.venv/bin/python}"

if [[ ! -x "$BUF" ]] || [[ "$("$BUF" --version)" != "$BUF_VERSION" ]]; then
  npm install --prefix .tools --no-save --no-audit --no-fund "@bufbuild/buf@${BUF_VERSION}"
fi

rpc_dir="$("$PYTHON" -c 'import pathlib, google.rpc.status_pb2 as m; print(pathlib.Path(m.__file__).parent)')"
rm -rf .tools/googleapis
mkdir -p .tools/googleapis/google/rpc
cp "$rpc_dir"/*.proto .tools/googleapis/google/rpc/

"$BUF" lint
"$BUF" format proto --diff --exit-code
echo "lint-proto.sh: buf lint and buf format clean"

#!/usr/bin/env bash
# Lints proto/ with buf (STANDARD + COMMENTS, see buf.yaml) and checks buf formatting.
#
#   scripts/lint-proto.sh                  lint + format check
#   scripts/lint-proto.sh --against REF    also `buf breaking` (FILE) against git REF
#
# buf is the npm package @bufbuild/buf, pinned, installed into .tools/ when missing.
# Runs offline: google/rpc/*.proto is copied from the installed
# googleapis-common-protos into .tools/googleapis, a buf module resolved against only.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION="1.75.0"
BUF=".tools/node_modules/.bin/buf"
PYTHON="${PYTHON:-.venv/bin/python}"

against=""
if [[ $# -gt 0 ]]; then
  if [[ $# -ne 2 || "$1" != "--against" ]]; then
    echo "usage: $0 [--against GIT_REF]" >&2
    exit 2
  fi
  against="$2"
fi

if [[ ! -x "$BUF" ]] || [[ "$("$BUF" --version)" != "$BUF_VERSION" ]]; then
  npm install --prefix .tools --no-save --no-audit --no-fund "@bufbuild/buf@${BUF_VERSION}"
fi

rpc_dir="$("$PYTHON" -c 'import pathlib, google.rpc.status_pb2 as m; print(pathlib.Path(m.__file__).parent)')"
rm -rf .tools/googleapis
mkdir -p .tools/googleapis/google/rpc
cp "$rpc_dir"/*.proto .tools/googleapis/google/rpc/

"$BUF" lint
"$BUF" format proto --diff --exit-code

if [[ -n "$against" ]]; then
  # `buf breaking --against .git#...` cannot see the gitignored google/rpc module, so
  # check against an exported copy of REF with that module added.
  base="$(mktemp -d)"
  trap 'rm -rf "$base"' EXIT
  git archive "$against" proto buf.yaml | tar -x -C "$base"
  mkdir -p "$base/.tools"
  cp -r .tools/googleapis "$base/.tools/"
  "$BUF" breaking --against "$base"
  echo "lint-proto.sh: no breaking change against $against"
fi
echo "lint-proto.sh: buf lint and buf format clean"

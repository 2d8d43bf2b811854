#!/usr/bin/env bash
# Regenerates gen/ from proto/: Python messages, .pyi stubs and gRPC stubs.
#
# Offline and deterministic: the protoc and plugins bundled in grpcio-tools (pinned in
# pyproject.toml), the well-known types bundled with it, and google/rpc/*.proto from the
# installed googleapis-common-protos, and buf/validate/validate.proto vendored under
# third_party/protovalidate (the protovalidate rules the contracts are annotated with;
# its Python module is generated here too, as the protovalidate package expects
# `buf.validate.validate_pb2` to be importable). gen/ is a source root: put it on
# sys.path and import `switchboard.<domain>.v1`. Running it twice leaves gen/ unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c 'import grpc_tools.protoc, google.rpc.status_pb2' 2>/dev/null; then
  echo "gen.sh: $PYTHON lacks grpcio-tools or googleapis-common-protos; create the venv first" >&2
  exit 1
fi
# The directory holding google/rpc/*.proto (site-packages of that interpreter).
googleapis_root="$("$PYTHON" -c 'import pathlib, google.rpc.status_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')"

mapfile -t protos < <(find proto -name '*.proto' | LC_ALL=C sort)
validate_root=third_party/protovalidate

rm -rf gen/switchboard gen/buf
mkdir -p gen
# Run as a module, grpc_tools adds its own include for google/protobuf/*.proto.
"$PYTHON" -m grpc_tools.protoc \
  -I proto \
  -I "$validate_root" \
  -I "$googleapis_root" \
  --python_out=gen \
  --pyi_out=gen \
  --grpc_python_out=gen \
  "${protos[@]}"
"$PYTHON" -m grpc_tools.protoc \
  -I "$validate_root" \
  --python_out=gen \
  --pyi_out=gen \
  "$validate_root/buf/validate/validate.proto"

# Every generated directory is a regular package.
find gen/switchboard gen/buf -type d -print0 | while IFS= read -r -d '' dir; do
  : >"$dir/__init__.py"
done

echo "gen.sh: generated $(find gen/switchboard -name '*.py' ! -name '__init__.py' | wc -l) modules from ${#protos[@]} protos into gen/"

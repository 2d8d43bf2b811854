#!/usr/bin/env bash
# Generates the page's TypeScript from proto/ (messages and service descriptors, by
# @bufbuild/protoc-gen-es) into src/gen/ (ignored by git: built, like dist/).
#
# Offline, as scripts/gen.sh at the repository's root: protoc from the venv's
# grpcio-tools, google/rpc/*.proto from its googleapis-common-protos, buf/validate from
# third_party/. The well-known types come from @bufbuild/protobuf/wkt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=../..
PYTHON="${PYTHON:-$root/.venv/bin/python}"
googleapis="$("$PYTHON" -c 'import pathlib, google.rpc.status_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')"
validate="$root/third_party/protovalidate"

mapfile -t protos < <(cd "$root/proto" && find switchboard -name '*.proto' | LC_ALL=C sort)
rm -rf src/gen
mkdir -p src/gen
"$PYTHON" -m grpc_tools.protoc \
  -I "$root/proto" -I "$validate" -I "$googleapis" \
  --plugin=protoc-gen-es=node_modules/.bin/protoc-gen-es \
  --es_out=src/gen \
  --es_opt=target=ts,import_extension=js \
  "${protos[@]}" buf/validate/validate.proto google/rpc/status.proto google/rpc/error_details.proto
echo "gen.sh: TypeScript for ${#protos[@]} protos in clients/web/src/gen/"

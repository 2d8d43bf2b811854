#!/bin/sh
# Debian's prometheus package, for `switchboard up --prometheus` and the rules' tests.
# Only its binaries are used (/usr/bin/prometheus, /usr/bin/promtool): the package's own
# service is kept from starting while it installs (policy-rc.d), and no recommended
# package (node exporter, another service) comes with it.
set -eu
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
}
install || { apt-get update -q >/dev/null && install; }

#!/usr/bin/env bash
# Debian packages some tests use: PostgreSQL (the distributed-search test starts its own server) and
# Chromium with ChromeDriver (the MLflow UI test drives a headless browser).
#
#   scripts/install-system-deps.sh [postgres] [chromium]     (no argument: both)
#
# Idempotent and quick when everything is there: apt runs only for what is missing. Needs root or
# password-less sudo, and apt-get; without them it says so and exits 1, and the tests that need the
# packages skip with the reason (`make test` calls this but never fails on it).
set -uo pipefail

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(postgres chromium)

# Debian keeps PostgreSQL's server programs off PATH, in /usr/lib/postgresql/<version>/bin.
have_postgres() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; }
have_chromium() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }

missing=()
for group in "${groups[@]}"; do
    case "$group" in
        postgres) have_postgres || missing+=(postgresql) ;;
        chromium) have_chromium || missing+=(chromium chromium-driver) ;;
        *) echo "install-system-deps: unknown group '$group' (postgres, chromium)" >&2; exit 2 ;;
    esac
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "install-system-deps: cannot install ${missing[*]}: not root and no password-less sudo" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install-system-deps: cannot install ${missing[*]}: no apt-get on this machine" >&2
    exit 1
fi

echo "install-system-deps: installing ${missing[*]} from Debian's packages" >&2
# The lock timeout lets concurrent runs (two engineers' `make test`) wait for each other instead of failing.
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300)
"${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
status=$?
[ $status -ne 0 ] && echo "install-system-deps: apt-get failed ($status) installing ${missing[*]}" >&2
exit $status

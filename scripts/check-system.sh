#!/bin/sh
# Installs the Debian packages named as arguments that are missing. As root it runs apt-get;
# otherwise it names the missing packages and fails -- or, after --optional, names them and
# succeeds (what needs them skips, saying so).
optional=""
if [ "$1" = "--optional" ]; then optional=1; shift; fi
missing=""
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
# A Python from elsewhere (pyenv, python.org) brings its own venv and headers.
if python3 -c "import venv, ensurepip, sysconfig, os; assert os.path.exists(sysconfig.get_paths()['include'] + '/Python.h')" 2>/dev/null; then
    missing=$(echo "$missing" | tr ' ' '\n' | grep -v -x -e python3-venv -e python3-dev | tr '\n' ' ')
fi
# Node.js may come from elsewhere too.
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    missing=$(echo "$missing" | tr ' ' '\n' | grep -v -x -e nodejs -e npm | tr '\n' ' ')
fi
missing=$(echo $missing)
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null || {
        echo "error: apt-get install $missing failed" >&2; exit 1; }
    exit 0
fi
if [ -n "$optional" ]; then
    echo "note: optional system packages missing: $missing (tests that need them skip)" >&2
    echo "      install them with: sudo apt-get install $missing" >&2
    exit 0
fi
echo "error: missing system packages: $missing" >&2
echo "       install them with: sudo apt-get install $missing" >&2
exit 1

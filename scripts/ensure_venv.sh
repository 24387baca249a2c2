# Source me: ensure_venv DIR EXTRAS — create or update a virtual environment from
# pyproject.toml. pip runs only when pyproject.toml or the extras changed since the
# last successful install (a stamp file holds their hash), so a second run starts
# in about a second instead of re-resolving ~80 packages.

# pip, minus one noise line per package: this machine's pip config lists local
# indexes that do not hold every package, and pip warns about each miss. The
# pipeline's status is pip's (the filter always succeeds).
_quiet_pip() {
  (set -o pipefail; "$@" 2>&1 | { grep -v '^WARNING: Location' || true; } >&2)
}

ensure_venv() {
  local dir=$1 extras=$2 root stamp want
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  stamp="$root/$dir/.jaxlearn-stamp"
  want=$( (cat "$root/pyproject.toml"; echo "$extras") | sha256sum | cut -d' ' -f1)
  [ -x "$root/$dir/bin/python" ] || python3 -m venv "$root/$dir"
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  echo "setting up $dir (jaxlearn$extras), a few minutes the first time ..." >&2
  if ! _quiet_pip "$root/$dir/bin/python" -m pip install --quiet --upgrade pip ||
     ! _quiet_pip "$root/$dir/bin/python" -m pip install --quiet -e "$root$extras"; then
    echo "pip install into $dir failed" >&2
    return 1
  fi
  echo "$want" >"$stamp"
}

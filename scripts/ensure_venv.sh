# Source me: ensure_venv DIR EXTRAS — create or update a virtual environment from
# pyproject.toml. pip runs only when pyproject.toml or the extras changed since the
# last successful install (a stamp file holds their hash), so a second run starts
# in about a second instead of re-resolving ~80 packages.
ensure_venv() {
  local dir=$1 extras=$2 root stamp want status
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  stamp="$root/$dir/.jaxlearn-stamp"
  want=$( (cat "$root/pyproject.toml"; echo "$extras") | sha256sum | cut -d' ' -f1)
  [ -x "$root/$dir/bin/python" ] || python3 -m venv "$root/$dir"
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  echo "setting up $dir (jaxlearn$extras), a few minutes the first time ..." >&2
  # This machine's pip config lists local indexes that do not hold every package;
  # pip warns once per package about them: drop those lines, keep everything else.
  "$root/$dir/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2
  "$root/$dir/bin/python" -m pip install --quiet -e "$root$extras" 2>&1 | grep -v '^WARNING: Location' >&2
  status=${PIPESTATUS[0]}
  if [ "$status" -ne 0 ]; then
    echo "pip install into $dir failed (exit $status)" >&2
    return 1
  fi
  echo "$want" >"$stamp"
}

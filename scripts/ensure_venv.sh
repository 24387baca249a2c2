# Source me: ensure_venv DIR EXTRAS — create or update a virtual environment from
# pyproject.toml. pip runs only when pyproject.toml or the extras changed since the
# last successful install (a stamp file holds their hash), so a second run starts
# in about a second instead of re-resolving ~60 packages.
ensure_venv() {
  local dir=$1 extras=$2 root stamp want
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  stamp="$root/$dir/.jaxlearn-stamp"
  want=$( (cat "$root/pyproject.toml"; echo "$extras") | sha256sum | cut -d' ' -f1)
  if [ ! -x "$root/$dir/bin/python" ]; then
    python3 -m venv "$root/$dir"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up $dir (jaxlearn$extras) ..." >&2
    "$root/$dir/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
    "$root/$dir/bin/python" -m pip install --quiet -e "$root$extras" 2>&1 | grep -v '^WARNING: Location' >&2 || true
    # pip's own exit status is hidden by the filter above: check the result instead.
    "$root/$dir/bin/python" -c "import jaxlearn" || { echo "install into $dir failed" >&2; return 1; }
    echo "$want" >"$stamp"
  fi
}

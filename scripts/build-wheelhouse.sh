#!/usr/bin/env bash
# Fill ./.cache/wheelhouse with wheels of the project's pinned dependencies (and everything they
# depend on), so that `docker build --build-arg WHEELHOUSE=1 .` installs them with no network.
#
# The dependency list is [project].dependencies of pyproject.toml. pip resolves it for this
# machine's Python, which must be the image's: CPython 3.11 on x86_64 Linux (glibc 2.28 or newer).
# Wheels already in the wheelhouse are reused, so running the script again only adds what changed.
# NOTE: torch pulls about 3 GB of nvidia-* wheels; they are kept because one image serves CPU and
# CUDA hosts.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheelhouse_dir="${WHEELHOUSE_DIR:-$repo_root/.cache/wheelhouse}"
python_bin="${PYTHON:-$repo_root/.venv/bin/python}"
if [ ! -x "$python_bin" ]; then
    python_bin="$(command -v python3)"
fi

python_version="$("$python_bin" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$python_version" != "3.11" ]; then
    echo "$python_bin is Python $python_version; the image runs Python 3.11, so its wheels would not install" >&2
    echo "set PYTHON to a Python 3.11 interpreter" >&2
    exit 1
fi

mkdir -p "$wheelhouse_dir"
requirements_file="$wheelhouse_dir/requirements.txt"
"$python_bin" - "$repo_root/pyproject.toml" >"$requirements_file" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    print("\n".join(tomllib.load(handle)["project"]["dependencies"]))
PY

echo "building wheels for $(wc -l <"$requirements_file") pinned dependencies into $wheelhouse_dir"
"$python_bin" -m pip wheel --wheel-dir "$wheelhouse_dir" --requirement "$requirements_file"
echo "wheelhouse ready: $(find "$wheelhouse_dir" -name '*.whl' | wc -l) wheels, $(du -sh "$wheelhouse_dir" | cut -f1)"

#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter (PATH first, then pyenv installs), or fails.
for py in python3.13 python3.12 python3 python; do
  if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    command -v "$py"; exit 0
  fi
done
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for py in "$root"/versions/3.12*/bin/python "$root"/versions/3.13*/bin/python; do
  if [ -x "$py" ]; then echo "$py"; exit 0; fi
done
echo "no Python >= 3.12 found; install one (e.g. pyenv install 3.12)" >&2
exit 1

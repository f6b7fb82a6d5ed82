#!/usr/bin/env bash
# The system packages `make demo` and `make test` need, installed with apt-get (Debian/Ubuntu) when run as root;
# otherwise one line naming the command to run, and exit status 1 so that make stops before it installs or tests.
#
#   scripts/system_setup.sh [venv] [dataset] [compiler]
#     venv      "$PY -m venv" works: Python 3.10+ with ensurepip, which Debian ships apart as python3.X-venv
#     dataset   Fashion-MNIST's four IDX files in $FASHION_MNIST_DIR (default: where Debian's dataset-fashion-mnist
#               puts them, the folder evolq_pl.data reads)
#     compiler  the C++ compiler torch.compile's CPU backend calls ($CXX, default g++)
#
# PY, FASHION_MNIST_DIR and CXX only change what is checked; what is installed is always the Debian packages.
set -euo pipefail

PY=${PY:-python3}
DATASET_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
CXX_CMD=${CXX:-g++}
DATASET_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz
               t10k-labels-idx1-ubyte.gz)

for need in "$@"; do
  case $need in
    venv | dataset | compiler) ;;
    *) echo "usage: $0 [venv] [dataset] [compiler] (got '$need')" >&2; exit 2 ;;
  esac
done

# Fills PACKAGES (Debian packages to install) and MISSING (what is missing, in words); exits where no package helps.
check() {
  PACKAGES=() MISSING=()
  local need version
  for need in "$@"; do
    case $need in
      venv)
        if ! version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
          echo "error: '$PY' does not run; install Python 3.10+ or name it with make PY=/path/to/python3" >&2
          exit 1
        fi
        if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
          echo "error: '$PY' is Python $version; evolq-pl needs 3.10+: name one with make PY=/path/to/python3" >&2
          exit 1
        fi
        if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
          PACKAGES+=("python$version-venv") MISSING+=("ensurepip for '$PY -m venv'")
        fi ;;
      dataset)
        local file
        for file in "${DATASET_FILES[@]}"; do
          if [ ! -f "$DATASET_DIR/$file" ]; then
            PACKAGES+=(dataset-fashion-mnist) MISSING+=("Fashion-MNIST in $DATASET_DIR")
            break
          fi
        done ;;
      compiler)
        command -v "${CXX_CMD%% *}" >/dev/null 2>&1 || { PACKAGES+=(g++) MISSING+=("a C++ compiler ($CXX_CMD)"); } ;;
    esac
  done
}

joined() { local out; out=$(printf '%s, ' "$@"); echo "${out%, }"; }

check "$@"
[ ${#PACKAGES[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: missing $(joined "${MISSING[@]}"); without apt-get this step cannot install them: install the" \
       "equivalent of Debian's ${PACKAGES[*]} yourself, then run make again" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: missing $(joined "${MISSING[@]}"); run: sudo apt-get update && sudo apt-get install -y" \
       "${PACKAGES[*]}   (then make again)" >&2
  exit 1
fi

echo "installing ${PACKAGES[*]} with apt-get (missing: $(joined "${MISSING[@]}"))"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
check "$@"
if [ ${#PACKAGES[@]} -gt 0 ]; then
  echo "error: still missing $(joined "${MISSING[@]}") after apt-get install; install it by hand, then run make" \
       "again" >&2
  exit 1
fi

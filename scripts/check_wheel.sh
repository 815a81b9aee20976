#!/usr/bin/env bash
# Build the sdist and (from it) the wheel, install the wheel into a clean virtual environment, and run the
# first commands a user runs from a folder that is not the checkout. Fails on the first command that fails.
#
#   scripts/check_wheel.sh            # needs `build` (pip install build, in the dev extra)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/flux2_lora-*.whl)"
sdist="$(ls "$work"/dist/flux2_lora-*.tar.gz)"
tar tzf "$sdist" >"$work/sdist.txt"
python -m zipfile -l "$wheel" | awk '{print $1}' >"$work/wheel.txt"
# Every run-time file of the checkout is in both: the sdist keeps the top-level folders, the wheel has them
# inside the package.
(cd "$repo" && git ls-files recipes launch 2>/dev/null || find recipes launch -type f) | while read -r f; do
    grep -qx "flux2_lora-[^/]*/$f" "$work/sdist.txt" || { echo "check_wheel: $f missing from $(basename "$sdist")"; exit 1; }
    grep -qx "flux2_lora/_files/$f" "$work/wheel.txt" || { echo "check_wheel: $f missing from $(basename "$wheel")"; exit 1; }
done

python -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null || true  # this machine's local wheels
python -m pip install -q "$wheel"

cd "$work"
mkdir elsewhere && cd elsewhere
export HF_HUB_OFFLINE=1 FLUX2_LORA_HOME="$work/home"
unset FLUX2_LORA_RECIPES
python - <<'PY'
import sys, flux2_lora, flux2_lora.resources as r
where = flux2_lora.__file__
assert "site-packages" in where, f"flux2_lora imported from {where}, not the installed wheel"
assert all("site-packages" in str(p) for p in (r.recipes_dir(), r.launch_dir())), (r.recipes_dir(), r.launch_dir())
print(f"check_wheel: flux2_lora {flux2_lora.__version__} from {where}")
PY
set -x
flux2-lora train --preset tiny --steps 3 --output run
test -f run/lora.safetensors
flux2-lora system presets
flux2-lora launch slurm-4nodes-fsdp --dry-run --output run-slurm   # the Slurm example shipped in the wheel
grep -q "srun" run-slurm/launch/job.sbatch
set +x
echo "check_wheel: the wheel installs and runs from another folder"

#!/usr/bin/env bash
# The adversarial kinds that cannot run in CI (tests/test_adversarial*.py hold the others): a full disk, a
# read-only file system, and files, folders and a cache that belong to another user. Each kind runs one
# crd-jax (or train.py) command and checks the contract: the exit status, exactly one line on stderr naming
# the problem, no traceback, every file that existed before byte-identical afterwards, nothing half-written.
#
#   benchmarks/adversarial_extra.sh            # prints PASS/FAIL/SKIP per kind; exit status 1 if any failed
#
# Needs root for the file systems (a tiny tmpfs, a loop-mounted ext4, a read-only bind mount) and root or
# setpriv/sudo to act as another user ("nobody"); kinds whose means are missing print SKIP with the reason.
# PYTHON overrides the interpreter (default: .venv/bin/python, else python3).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
WORK="$(mktemp -d /tmp/crd-adversarial-extra.XXXXXX)"
chmod 755 "$WORK"
MOUNTS=()
cleanup() {
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
export JAX_PLATFORMS=cpu PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
export CRD_JAX_CACHE_DIR="$WORK/cache"
PASS=0 FAIL=0 SKIP=0

# --- assets: two 32^3 images, a zero displacement, a small model folder (random weights) ---------------------
"$PY" - "$WORK/assets" <<'EOF' || { echo "could not create the assets"; exit 1; }
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import nibabel as nib, numpy as np
from scipy import ndimage
from model_folders import make_model_folder
root = Path(sys.argv[1]); root.mkdir()
def vol(seed):
    v = ndimage.gaussian_filter(np.random.default_rng(seed).random((32, 32, 32)), 2.0)
    return ((v - v.min()) / np.ptp(v)).astype(np.float32)
for name, data in (("f", vol(0)), ("m", vol(1)), ("disp", np.zeros((32, 32, 32, 3), np.float32))):
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / f"{name}.nii.gz"))
nib.save(nib.Nifti1Image(vol(1), np.eye(4)), str(root / "m_big.nii"))  # uncompressed, 128 KiB
make_model_folder(root / "model", 32, "minmax")
EOF
chmod -R a+rX "$WORK/assets"
A="$WORK/assets"

snapshot() {  # every path under $1 with its type, mode and (files) content hash
    (cd "$1" && find . -mindepth 1 -printf '%y %m %p\n' | sort; find . -type f -readable -exec sha256sum {} + 2>/dev/null | sort -k2)
}

# check NAME STATUS NEEDLE FOLDER [AS_USER] -- COMMAND...: runs COMMAND (as AS_USER when given: "nobody");
# FOLDER is snapshotted before and after and must be unchanged
check() {
    local name="$1" want="$2" needle="$3" folder="$4"; shift 4
    local as=""
    if [ "$1" != "--" ]; then as="$1"; shift; fi
    shift  # --
    local before after err status lines
    before="$(snapshot "$folder")"
    err="$WORK/stderr.$name"
    if [ -n "$as" ]; then
        env HOME=/nonexistent "${AS_ENV[@]}" setpriv --reuid="$as" --regid="$as" --clear-groups -- "$@" >/dev/null 2>"$err"
    else
        "$@" >/dev/null 2>"$err"
    fi
    status=$?
    after="$(snapshot "$folder")"
    lines=$(grep -c '' "$err")
    local why=""
    [ "$status" = "$want" ] || why="exit $status, expected $want"
    [ "$lines" = 1 ] || why="${why:+$why; }$lines lines on stderr"
    grep -q Traceback "$err" && why="${why:+$why; }a traceback"
    grep -qF -- "$needle" "$err" || why="${why:+$why; }no '$needle' on stderr"
    [ "$before" = "$after" ] || why="${why:+$why; }files under $folder changed"
    if [ -z "$why" ]; then
        PASS=$((PASS + 1)); printf 'PASS %-40s %s\n' "$name" "$(head -c 200 "$err")"
    else
        FAIL=$((FAIL + 1)); printf 'FAIL %-40s %s\n     stderr: %s\n' "$name" "$why" "$(tail -c 600 "$err")"
    fi
}

# check_success NAME FOLDER AS_USER -- COMMAND...: exit 0 and nothing on stderr
check_success() {
    local name="$1" folder="$2" as="$3"; shift 4
    local err="$WORK/stderr.$name" status
    env HOME=/nonexistent "${AS_ENV[@]}" setpriv --reuid="$as" --regid="$as" --clear-groups -- "$@" >/dev/null 2>"$err"
    status=$?
    if [ "$status" = 0 ] && [ ! -s "$err" ]; then
        PASS=$((PASS + 1)); printf 'PASS %-40s exit 0, nothing on stderr\n' "$name"
    else
        FAIL=$((FAIL + 1)); printf 'FAIL %-40s exit %s\n     stderr: %s\n' "$name" "$status" "$(tail -c 600 "$err")"
    fi
}

skip() { SKIP=$((SKIP + 1)); printf 'SKIP %-40s %s\n' "$1" "$2"; }

CRD=("$PY" -m crd_jax)
AS_ENV=()  # environment variables for the commands run as another user
ROOT_USER=0; [ "$(id -u)" = 0 ] && ROOT_USER=1

# --- a full disk: a 256 KiB tmpfs (outputs need more; the staging folder must go, the target stay empty) ------
full_disk() {
    local mnt="$WORK/full"
    mkdir -p "$mnt"
    if [ $ROOT_USER = 1 ] && mount -t tmpfs -o size=256k tmpfs "$mnt" 2>/dev/null; then
        MOUNTS+=("$mnt")
        chmod 777 "$mnt"
        dd if=/dev/zero of="$mnt/filler" bs=1k count=1024 status=none 2>/dev/null  # until it is full
        check disk_full_export 2 "$mnt" "$mnt" -- "${CRD[@]}" export --disp "$A/disp.nii.gz" --fixed "$A/f.nii.gz" \
            --format itk --out-dir "$mnt/x"
        check disk_full_register 2 "$mnt" "$mnt" -- "${CRD[@]}" register --model "$A/model" --fixed "$A/f.nii.gz" \
            --moving "$A/m.nii.gz" --out-dir "$mnt/out" --uncompressed
        check disk_full_apply 2 "$mnt" "$mnt" -- "${CRD[@]}" apply --disp "$A/disp.nii.gz" --reference "$A/f.nii.gz" \
            --image "$A/m_big.nii" --out "$mnt/w.nii"
        check disk_full_convert_official 2 "$mnt" "$mnt" -- "$PY" -c "
import sys; sys.path.insert(0, '$HERE/tests'); sys.argv = ['crd-jax', 'convert-official', '--checkpoint', '$WORK/ck.pth', '--kind', 'student', '--out', '$mnt/conv']
from test_cli import _random_official_state, _write_legacy
_write_legacy('$WORK/ck.pth', _random_official_state(False))
from crd_jax.cli.main import entry; entry()"
        check disk_full_train_py 2 "error: " "$mnt" -- "$PY" "$HERE/train.py" --config="$HERE/configs/synthetic_vm_2d.py" \
            --config.data.synthetic.shape="(32,32)" --config.data.synthetic.train=4 --config.data.synthetic.val=0 \
            --config.data.synthetic.test=0 "--config.pipeline=('vm_l',)" --config.stages.vm_l.evaluate=False \
            --config.stages.vm_l.steps=2 --config.train.batch_size=2 --config.train.progress_bar=False \
            --config.workdir="$mnt/run"
    else
        skip disk_full "needs root to mount a tmpfs"
    fi
}

# --- a read-only file system: outputs refused before any computation ----------------------------------------
read_only_fs() {
    local mnt="$WORK/ro"
    mkdir -p "$mnt"
    if [ $ROOT_USER = 1 ] && mount -t tmpfs -o size=1m,ro tmpfs "$mnt" 2>/dev/null; then
        MOUNTS+=("$mnt")
        check read_only_fs_register 2 "$mnt" "$mnt" -- "${CRD[@]}" register --model "$A/model" --fixed "$A/f.nii.gz" \
            --moving "$A/m.nii.gz" --out-dir "$mnt/out"
        check read_only_fs_export 2 "$mnt" "$mnt" -- "${CRD[@]}" export --disp "$A/disp.nii.gz" --fixed "$A/f.nii.gz" \
            --format itk --out-dir "$mnt/x"
    else
        skip read_only_fs "needs root to mount a read-only tmpfs"
    fi
}

# --- another user's files: run as "nobody" against root's files -----------------------------------------------
other_user() {
    if [ $ROOT_USER != 1 ] || ! command -v setpriv >/dev/null; then
        skip other_user "needs root and setpriv to act as another user"
        return
    fi
    local d="$WORK/users"
    local home="$WORK/nobody_home"  # nobody's own folder: its cache and its outputs
    mkdir -p "$d/private" "$d/locked_out" "$home"
    chmod 755 "$d" "$d/locked_out"
    cp "$A/m.nii.gz" "$d/private/m.nii.gz"
    chmod 700 "$d/private"; chmod 600 "$d/private/m.nii.gz"  # root's scan: nobody cannot read it
    cp "$A/m.nii.gz" "$d/m_600.nii.gz"; chmod 600 "$d/m_600.nii.gz"
    chown 65534:65534 "$home"
    # a command nobody runs on its own files: no line on stderr
    AS_ENV=(CRD_JAX_CACHE_DIR="$home/c")
    check_success other_user_plain_run "$home" 65534 -- "${CRD[@]}" export --disp "$A/disp.nii.gz" --fixed "$A/f.nii.gz" \
        --format itk --out-dir "$home/exported"
    # the kinds below are about the files, not the kernel: a native kernel built by root with mode 0711 (seen in
    # a checkout) cannot be loaded by others and adds a warning to commands that convolve
    AS_ENV=(CRD_JAX_CACHE_DIR="$home/c" CRD_JAX_FAST_CONV=0)
    check other_user_unreadable_moving 2 "m_600.nii.gz" "$d" 65534 -- "${CRD[@]}" register --model "$A/model" \
        --fixed "$A/f.nii.gz" --moving "$d/m_600.nii.gz" --out-dir "$home/out"
    check other_user_file_in_private_folder 2 "private" "$d" 65534 -- "${CRD[@]}" register \
        --model "$A/model" --fixed "$A/f.nii.gz" --moving "$d/private/m.nii.gz" --out-dir "$home/out"
    check other_user_output_folder 2 "locked_out" "$d" 65534 -- "${CRD[@]}" export --disp "$A/disp.nii.gz" \
        --fixed "$A/f.nii.gz" --format itk --out-dir "$d/locked_out/x"
    check other_user_model_folder_unreadable 2 "private: cannot be read" "$d" 65534 -- "${CRD[@]}" register \
        --model "$d/private" --fixed "$A/f.nii.gz" --moving "$A/m.nii.gz" --out-dir "$home/out"
    check other_user_train_workdir 2 "error: " "$d" 65534 -- "$PY" "$HERE/train.py" \
        --config.workdir="$d/locked_out/run"
    # a cache folder that belongs to root, used by nobody: one warning line, caching off, the command succeeds
    mkdir -p "$d/root_cache/executables" "$d/root_cache/xla" "$d/root_cache/shapes"
    chmod -R 755 "$d/root_cache"
    AS_ENV=(CRD_JAX_CACHE_DIR="$d/root_cache")
    check other_user_cache_folder 0 "belongs to another user" "$d/root_cache" 65534 -- "${CRD[@]}" apply --disp "$A/disp.nii.gz" --reference "$A/f.nii.gz" \
        --image "$A/m.nii.gz" --out "$home/applied.nii.gz"
}

# --- root's own cache folder owned by nobody (a planted folder): one warning line, caching off ----------------
planted_cache() {
    if [ $ROOT_USER != 1 ]; then skip planted_cache "needs root to give a folder to another user"; return; fi
    local d="$WORK/planted"
    mkdir -p "$d/c/executables" "$d/out"
    chown 65534:65534 "$d/c/executables"
    check planted_cache_folder 0 "belongs to another user" "$d/c/executables" -- env CRD_JAX_CACHE_DIR="$d/c" "${CRD[@]}" export \
        --disp "$A/disp.nii.gz" --fixed "$A/f.nii.gz" --format itk --out-dir "$d/out/x"
}

full_disk
read_only_fs
other_user
planted_cache
echo "adversarial_extra: $PASS passed, $FAIL failed, $SKIP skipped"
[ "$FAIL" = 0 ]

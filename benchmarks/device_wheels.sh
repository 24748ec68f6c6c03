#!/usr/bin/env bash
# Fetches the wheels device_check.sh needs on the device image (Python 3.12, no network there) into .whl/,
# a folder git ignores (.git/info/exclude); name it in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
for pkg in nibabel==5.4.2 ml_collections==1.1.0 tensorboardX==2.6.5; do  # SimpleITK (53 MB) stays: its tests skip
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d .whl "$pkg"
done
ls -la .whl

#!/usr/bin/env bash
# Download, here, the wheels the device machine lacks (Python 3.12, x86-64) into .whl/ (ignored through
# .git/info/exclude), for benchmarks/gpu/run_checks.sh. Its image has torch, transformers, accelerate, peft,
# safetensors, numpy, OpenCV, timm and scikit-image; graphflow needs these besides (about 54 MB in all).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 controlnet-aux==0.0.10 jsonschema==4.26.0 referencing jsonschema-specifications rpds-py \
    importlib-metadata torchao==0.18.0 optimum-quanto==0.2.7 bitsandbytes==0.50.2
du -sh .whl

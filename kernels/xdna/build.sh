#!/usr/bin/env bash
# Builds the NPU kernels of manifest.toml into build/ (xclbin + instruction stream each) with
# AMD's IRON/mlir-aie toolchain. It must be installed (https://github.com/Xilinx/mlir-aie: the
# mlir_aie python wheel, llvm-aie/Peano, and XRT for aiecc.py's xclbin packaging); this script
# only checks for it and says what is missing. Nothing here has been built by the project yet.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v python3 >/dev/null || missing+=("python3")
python3 -c "import aie.iron" 2>/dev/null || missing+=("the aie python package (mlir-aie's IRON)")
python3 -c "import ml_dtypes" 2>/dev/null || missing+=("ml_dtypes")
command -v aiecc.py >/dev/null || missing+=("aiecc.py (mlir-aie)")
[ -n "${PEANO_INSTALL_DIR:-}" ] || missing+=("PEANO_INSTALL_DIR (llvm-aie)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "build.sh: the IRON/mlir-aie toolchain is not installed here; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  echo "Install it from mlir-aie's release channel on a machine that can reach it, then rerun." >&2
  exit 2
fi

mkdir -p build
"$PEANO_INSTALL_DIR/bin/clang++" --target=aie2-none-unknown-elf -O2 -std=c++20 \
  -I"$(python3 -c 'import aie, os; print(os.path.dirname(aie.__file__))')/../../include" \
  -c aie/ops.cc -o build/ops.o

build() {  # name op shape...
  local name=$1; shift
  python3 iron_ops.py "$@" > "build/$name.mlir"
  (cd build && aiecc.py --no-aiesim --aie-generate-xclbin --aie-generate-npu-insts \
      --no-compile-host --xclbin-name="$name.xclbin" --npu-insts-name="$name.insts.bin" \
      "$name.mlir")
  echo "built build/$name.xclbin and build/$name.insts.bin" >&2
}

build matvec_bf16_576x576 matvec 576 576
build matvec_bf16_192x576 matvec 192 576
build matvec_bf16_1536x576 matvec 1536 576
build matmul_bf16_576x576x64 matmul 576 576 64
build rms_norm_bf16_576 rms_norm 576
build rope_bf16_64 rope 9 64
build silu_mul_bf16_1536 silu 1536
build softmax_bf16_2048 softmax 2048
echo "build.sh: done; unicornd loads them from $(pwd) (UNICORN_XDNA_KERNELS=$(pwd))" >&2

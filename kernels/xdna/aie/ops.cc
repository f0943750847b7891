// Compute-tile code of unicorn's NPU kernels (AIE2, aie_api). UNVERIFIED: written for
// mlir-aie's Peano/xchesscc toolchain and never compiled or run here; see ../README.md.
// bf16 in and out, f32 accumulation, vectors of 16 lanes.

#include <aie_api/aie.hpp>
#include <stdint.h>

extern "C" {

// y[r] = sum_k W[r*k + i] * x[i] for r < rows.
void matvec_bf16(const bfloat16 *w, const bfloat16 *x, bfloat16 *y, int32_t rows, int32_t k) {
  for (int r = 0; r < rows; r++) {
    aie::accum<accfloat, 16> acc = aie::zeros<accfloat, 16>();
    for (int i = 0; i < k; i += 16) {
      acc = aie::mac(acc, aie::load_v<16>(w + r * k + i), aie::load_v<16>(x + i));
    }
    y[r] = (bfloat16)aie::reduce_add(acc.to_vector<float>());
  }
}

// y = x / sqrt(mean(x^2) + 1e-5) * w
void rms_norm_bf16(const bfloat16 *x, const float *w, bfloat16 *y, int32_t k) {
  aie::accum<accfloat, 16> acc = aie::zeros<accfloat, 16>();
  for (int i = 0; i < k; i += 16) {
    auto v = aie::load_v<16>(x + i);
    acc = aie::mac(acc, v, v);
  }
  float ms = aie::reduce_add(acc.to_vector<float>()) / (float)k;
  float inv = aie::invsqrt(ms + 1e-5f);
  for (int i = 0; i < k; i++) y[i] = (bfloat16)((float)x[i] * inv * w[i]);
}

// y = silu(g) * u, silu(g) = g / (1 + exp(-g))
void silu_mul_bf16(const bfloat16 *g, const bfloat16 *u, bfloat16 *y, int32_t k) {
  for (int i = 0; i < k; i++) {
    float v = (float)g[i];
    y[i] = (bfloat16)(v * aie::inv(1.0f + aie::exp2(-v * 1.4426950408889634f)) * (float)u[i]);
  }
}

// Numerically stable softmax of one row.
void softmax_bf16(const bfloat16 *x, bfloat16 *y, int32_t k) {
  float m = -3.0e38f;
  for (int i = 0; i < k; i++) m = (float)x[i] > m ? (float)x[i] : m;
  float s = 0.0f;
  for (int i = 0; i < k; i++) s += aie::exp2(((float)x[i] - m) * 1.4426950408889634f);
  float inv = aie::inv(s);
  for (int i = 0; i < k; i++) y[i] = (bfloat16)(aie::exp2(((float)x[i] - m) * 1.4426950408889634f) * inv);
}

// Neox RoPE of one head of d dims: table holds cos[0..d/2) then sin[0..d/2) for this position.
void rope_neox_bf16(const bfloat16 *x, const bfloat16 *table, bfloat16 *y, int32_t d) {
  int h = d / 2;
  for (int i = 0; i < h; i++) {
    float a = (float)x[i], b = (float)x[i + h];
    float c = (float)table[i], s = (float)table[i + h];
    y[i] = (bfloat16)(a * c - b * s);
    y[i + h] = (bfloat16)(a * s + b * c);
  }
}

}  // extern "C"

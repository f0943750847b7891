#version 450
// RoPE in place on `rows = n_tokens * n_heads` heads of `head_dim` values, as
// unicorn_kernels::ops::Rope (Rope::cache then Rope::apply): pair i (< n_dims / 2) of a head of the
// token at `pos` rotates by t = freq_scale * (pos * theta_scale^i), the power built by repeated f32
// multiplication as the CPU does (theta_scale = freq_base^(-2 / n_dims), computed on the host with
// the CPU's powf), so t is the CPU's f32 value exactly. Mode 0 (normal) rotates (x[2i], x[2i+1]),
// mode 1 (neox) (x[i], x[i + n_dims / 2]); dimensions from n_dims on pass through.
//
// sin and cos are reduced to [-pi, pi] first (Cody-Waite, 2 pi in three parts whose products with
// k < 2^16 are exact in f32), because device sin/cos are accurate only near zero. One invocation
// per pair, in a grid-stride loop.

layout(std430, binding = 0) buffer X { float xdata[]; };
layout(std430, binding = 1) readonly buffer Pos { uint pos[]; };
layout(std430, binding = 2) readonly buffer Unused { float unused[]; };

layout(push_constant) uniform Params {
    uint rows;        // n_tokens * n_heads
    uint n_heads;
    uint head_dim;
    uint half_dims;   // n_dims / 2
    uint mode;        // 0 normal, 1 neox
    float theta_scale;
    float freq_scale;
} p;

#include "common.glsl"

void main() {
    uint n = p.rows * p.half_dims;
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint g = gl_GlobalInvocationID.x; g < n; g += stride) {
        uint row = g / p.half_dims;
        uint i = g - row * p.half_dims;
        precise float theta = float(pos[row / p.n_heads]);
        for (uint k = 0u; k < i; ++k) {
            theta *= p.theta_scale;
        }
        precise float t = p.freq_scale * theta;
        // 2 pi = C1 + C2 + C3 (+ 2e-13): C1 and C2 have 8 significant bits.
        float k = round(t * 0.15915494309189535);
        precise float r = t - k * uintBitsToFloat(0x40c90000u);
        r = r - k * uintBitsToFloat(0x3afd0000u);
        r = r - k * uintBitsToFloat(0x36aa2217u);
        float c = cos(r);
        float s = sin(r);
        uint base = row * p.head_dim;
        uint a = p.mode == 0u ? base + 2u * i : base + i;
        uint b = p.mode == 0u ? a + 1u : a + p.half_dims;
        float x0 = xdata[a];
        float x1 = xdata[b];
        xdata[a] = x0 * c - x1 * s;
        xdata[b] = x0 * s + x1 * c;
    }
}

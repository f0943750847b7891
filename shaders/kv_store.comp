#version 450
// Writes the keys and values of `n_tok` tokens (each `n_kv_head x head_dim` f32, as the K and V
// projections give them, starting at value `src_off` of K and of V) at positions pos0.. of one
// layer's cache: K at element `kbase`, V at `vbase` of the context's cache buffer, each
// `n_kv_head x n_ctx x head_dim`, head-major (unicorn_kernels::attention's layout). As
// KvCache::store for each token: f16 (round to nearest even) or, with KV_F32, f32. head_dim is
// even, so each invocation writes two values of one head (one word of an f16 cache; the bases
// are even). Grid-stride loop.

layout(std430, binding = 0) readonly buffer K { float ksrc[]; };
layout(std430, binding = 1) readonly buffer V { float vsrc[]; };
layout(std430, binding = 2) buffer Cache { uint cache[]; };

layout(push_constant) uniform Params {
    uint pairs;     // n_kv_head * head_dim / 2, per token
    uint head_dim;
    uint n_ctx;
    uint pos0;
    uint n_tok;
    uint src_off;
    uint kbase;
    uint vbase;
} p;

#include "common.glsl"

void main() {
    uint n = p.n_tok * p.pairs;
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < n; i += stride) {
        uint t = i / p.pairs;
        uint e = 2u * (i - t * p.pairs);
        uint g = e / p.head_dim;
        uint d = e - g * p.head_dim;
        uint s = p.src_off + t * 2u * p.pairs + e;
        uint at = (g * p.n_ctx + p.pos0 + t) * p.head_dim + d;
#ifdef KV_F32
        cache[p.kbase + at] = floatBitsToUint(ksrc[s]);
        cache[p.kbase + at + 1u] = floatBitsToUint(ksrc[s + 1u]);
        cache[p.vbase + at] = floatBitsToUint(vsrc[s]);
        cache[p.vbase + at + 1u] = floatBitsToUint(vsrc[s + 1u]);
#else
        cache[(p.kbase + at) >> 1] = f32_to_f16(ksrc[s]) | (f32_to_f16(ksrc[s + 1u]) << 16);
        cache[(p.vbase + at) >> 1] = f32_to_f16(vsrc[s]) | (f32_to_f16(vsrc[s + 1u]) << 16);
#endif
    }
}

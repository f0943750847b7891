#version 450
// Writes one token's keys or values (`n_kv_head x head_dim` f32, as the K or V projection gives
// them) at position `pos` of an f16 cache of `n_kv_head x n_ctx x head_dim`, head-major, as
// unicorn_kernels::attention::KvCache::store with KvDataMut::F16 (round to nearest even). head_dim
// is even, so each invocation writes one whole word: two halves of one head. Grid-stride loop.

layout(std430, binding = 0) readonly buffer Src { float src[]; };
layout(std430, binding = 1) readonly buffer Unused { float unused[]; };
layout(std430, binding = 2) buffer Cache { uint cache[]; };

layout(push_constant) uniform Params {
    uint pairs;     // n_kv_head * head_dim / 2
    uint head_dim;
    uint n_ctx;
    uint pos;
} p;

#include "common.glsl"

void main() {
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < p.pairs; i += stride) {
        uint e = 2u * i;
        uint g = e / p.head_dim;
        uint d = e - g * p.head_dim;
        uint at = ((g * p.n_ctx + p.pos) * p.head_dim + d) >> 1;
        cache[at] = f32_to_f16(src[e]) | (f32_to_f16(src[e + 1u]) << 16);
    }
}

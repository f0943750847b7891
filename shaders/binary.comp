#version 450
// Element-wise binary ops: out = a + b (op 0) or a * b (op 1), as unicorn_kernels::ops::add_assign
// and mul_assign. A grid-stride loop, so any length fits the dispatch limits.

layout(std430, binding = 0) readonly buffer A { float adata[]; };
layout(std430, binding = 1) readonly buffer B { float bdata[]; };
layout(std430, binding = 2) writeonly buffer Out { float odata[]; };

layout(push_constant) uniform Params {
    uint n;
    uint op;
} p;

#include "common.glsl"

void main() {
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < p.n; i += stride) {
        float a = adata[i];
        float b = bdata[i];
        odata[i] = p.op == 0u ? a + b : a * b;
    }
}

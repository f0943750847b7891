#version 450
// Element-wise ops: out = a + b (op 0), a * b (op 1), as unicorn_kernels::ops::add_assign and
// mul_assign, or a * s (op 2, b unused), as unicorn_kernels::ops::scale. A grid-stride loop, so
// any length fits the dispatch limits.

layout(std430, binding = 0) readonly buffer A { float adata[]; };
layout(std430, binding = 1) readonly buffer B { float bdata[]; };
layout(std430, binding = 2) writeonly buffer Out { float odata[]; };

layout(push_constant) uniform Params {
    uint n;
    uint op;
    float s;
} p;

#include "common.glsl"

void main() {
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < p.n; i += stride) {
        float a = adata[i];
        if (p.op == 2u) {
            odata[i] = a * p.s;
        } else {
            float b = bdata[i];
            odata[i] = p.op == 0u ? a + b : a * b;
        }
    }
}

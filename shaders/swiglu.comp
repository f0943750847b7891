#version 450
// SwiGLU: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)), as unicorn_kernels::ops::swiglu.
// A grid-stride loop, so any length fits the dispatch limits.

layout(std430, binding = 0) readonly buffer Gate { float gdata[]; };
layout(std430, binding = 1) readonly buffer Up { float udata[]; };
layout(std430, binding = 2) writeonly buffer Out { float odata[]; };

layout(push_constant) uniform Params {
    uint n;
} p;

#include "common.glsl"

void main() {
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < p.n; i += stride) {
        float g = gdata[i];
        odata[i] = g / (1.0 + exp(-g)) * udata[i];
    }
}

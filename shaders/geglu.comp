#version 450
// GeGLU: out = gelu_tanh(gate) * up, as unicorn_kernels::ops::geglu, with
// gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) g (1 + 0.044715 g^2))) and
// tanh(z) = 1 - 2 / (exp(2z) + 1) as the CPU's AVX2 path computes it (saturating correctly at both
// ends; exp_acc is +inf above 89, giving t = 1), exp from common.glsl's exp_acc. Grid-stride loop.

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
        float z = 0.7978846 * g * (1.0 + 0.044715 * g * g);
        float t = 1.0 - 2.0 / (exp_acc(2.0 * z) + 1.0);
        odata[i] = 0.5 * g * (1.0 + t) * udata[i];
    }
}

#version 450
// RMSNorm over rows of `dim`: out = x * (1 / sqrt(mean(x^2) + eps)) [* weight], as
// unicorn_kernels::ops::rms_norm (the weight applied as a second rounding). One workgroup per row.

layout(std430, binding = 0) readonly buffer X { float xdata[]; };
layout(std430, binding = 1) readonly buffer Wt { float wdata_f[]; };
layout(std430, binding = 2) writeonly buffer Out { float odata[]; };

layout(push_constant) uniform Params {
    uint rows;
    uint dim;
    uint has_weight;
    float eps;
} p;

#include "common.glsl"

void main() {
    uint row = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    if (row >= p.rows) {
        return;
    }
    uint tid = gl_LocalInvocationID.x;
    uint base = row * p.dim;
    float ss = 0.0;
    for (uint e = tid; e < p.dim; e += WG) {
        float v = xdata[base + e];
        ss += v * v;
    }
    ss = wg_sum(ss);
    float mean = ss / float(p.dim);
    float scale = 1.0 / sqrt(mean + p.eps);
    for (uint e = tid; e < p.dim; e += WG) {
        float v = xdata[base + e] * scale;
        if (p.has_weight != 0u) {
            v *= wdata_f[e];
        }
        odata[base + e] = v;
    }
}

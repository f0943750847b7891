#version 450
// Softmax over rows of `dim`: out = exp(x - max) / sum(exp(x - max)), as
// unicorn_kernels::ops::softmax (which sums in f64; here each invocation sums its share with Kahan
// compensation, then the workgroup adds the partial sums). exp is common.glsl's exp_acc: the
// device's exp loses |x| ulp. One workgroup per row.

layout(std430, binding = 0) readonly buffer X { float xdata[]; };
layout(std430, binding = 1) readonly buffer Unused { float unused[]; };
layout(std430, binding = 2) writeonly buffer Out { float odata[]; };

layout(push_constant) uniform Params {
    uint rows;
    uint dim;
} p;

#include "common.glsl"

void main() {
    uint row = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    if (row >= p.rows) {
        return;
    }
    uint tid = gl_LocalInvocationID.x;
    uint base = row * p.dim;
    float m = uintBitsToFloat(0xff800000u); // -inf
    for (uint e = tid; e < p.dim; e += WG) {
        m = max(m, xdata[base + e]);
    }
    m = wg_max(m);
    precise float s = 0.0;
    precise float c = 0.0;
    for (uint e = tid; e < p.dim; e += WG) {
        precise float y = exp_acc(xdata[base + e] - m) - c;
        precise float t = s + y;
        c = (t - s) - y;
        s = t;
    }
    float sum = wg_sum(s);
    float inv = 1.0 / sum;
    for (uint e = tid; e < p.dim; e += WG) {
        odata[base + e] = exp_acc(xdata[base + e] - m) * inv;
    }
}

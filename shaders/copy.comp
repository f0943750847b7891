#version 450
// out[dst_off + i] = in[src_off + i] for i < n: gathers rows of an activation on the device (the
// rows that want logits) so that the hidden state need not come back to the host. Grid-stride.

layout(std430, binding = 0) readonly buffer In { float idata[]; };
layout(std430, binding = 1) readonly buffer Unused { float unused[]; };
layout(std430, binding = 2) buffer Out { float odata[]; };

layout(push_constant) uniform Params {
    uint n;
    uint src_off;
    uint dst_off;
} p;

#include "common.glsl"

void main() {
    uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < p.n; i += stride) {
        odata[p.dst_off + i] = idata[p.src_off + i];
    }
}

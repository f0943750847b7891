#version 450
// Matrix-vector product with GGUF weights: out[t * rows + r] = dot(W[r], x[t]).
// Compiled once per weight format (-DFORMAT_Q4_0 ... -DFORMAT_Q6_K, -DFORMAT_BF16, -DFORMAT_F32),
// with and without -DUSE_SUBGROUP. One workgroup per output row and token; the invocations split
// the row in units of 8 elements (32-element blocks: half of each of two 16-element halves of a
// block; k-quants: 8 consecutive elements), accumulate in f32 and reduce.
// Grid: x * y covers the rows (x is capped by maxComputeWorkGroupCount), z the tokens.

layout(std430, binding = 0) readonly buffer Weights { uint wdata[]; };
layout(std430, binding = 1) readonly buffer X { float xdata[]; };
layout(std430, binding = 2) writeonly buffer Out { float odata[]; };

layout(push_constant) uniform Params {
    uint rows;
    uint cols;      // a multiple of 32 for the block formats, 256 for the k-quants
    uint w_off;     // byte offset of row 0 in wdata
    uint row_bytes; // bytes per weight row
    uint x_off;     // element offset of token 0 in xdata; tokens are `cols` apart
    uint out_off;   // element offset of token 0 in odata; tokens are `rows` apart
} p;

#define HAVE_WDATA
#include "common.glsl"
#include "dequant.glsl"

void main() {
    uint row = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    if (row >= p.rows) {
        return; // uniform across the workgroup
    }
    uint t = gl_WorkGroupID.z;
    uint tid = gl_LocalInvocationID.x;
    uint rb = p.w_off + row * p.row_bytes;
    uint xb = p.x_off + t * p.cols;
    float sum = 0.0;
#if QUANT == 2
    // k-quants: 32 units of 8 consecutive elements per 256-element super-block.
    uint units = (p.cols / 256u) * 32u;
    for (uint u = tid; u < units; u += WG) {
        uint blk = u >> 5;
        uint e0 = (u & 31u) * 8u;
        vec4 lo;
        vec4 hi;
        dequant8(rb + blk * BLOCK_BYTES, e0, lo, hi);
        uint xe = xb + blk * 256u + e0;
        vec4 xl = vec4(xdata[xe], xdata[xe + 1u], xdata[xe + 2u], xdata[xe + 3u]);
        vec4 xh = vec4(xdata[xe + 4u], xdata[xe + 5u], xdata[xe + 6u], xdata[xe + 7u]);
        sum += dot(lo, xl) + dot(hi, xh);
    }
#elif QUANT
    uint units = (p.cols / 32u) * 4u;
    for (uint u = tid; u < units; u += WG) {
        uint blk = u >> 2;
        uint i = (u & 3u) * 4u;
        vec4 lo;
        vec4 hi;
        dequant8(rb + blk * BLOCK_BYTES, i, lo, hi);
        uint xe = xb + blk * 32u + i;
        vec4 xl = vec4(xdata[xe], xdata[xe + 1u], xdata[xe + 2u], xdata[xe + 3u]);
        vec4 xh = vec4(xdata[xe + 16u], xdata[xe + 17u], xdata[xe + 18u], xdata[xe + 19u]);
        sum += dot(lo, xl) + dot(hi, xh);
    }
#else
    for (uint e = tid; e < p.cols; e += WG) {
        sum += ld_elem(rb, e) * xdata[xb + e];
    }
#endif
    sum = wg_sum(sum);
    if (tid == 0u) {
        odata[p.out_off + t * p.rows + row] = sum;
    }
}

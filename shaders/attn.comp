#version 450
// Decode attention: one query token, `n_head` query heads over an f16 KV cache of
// `n_kv_head x n_ctx x head_dim` (head-major, unicorn_kernels::attention's layout), query head h
// reading KV head h / group. out_h = softmax_j(cap(q_h . K[j] * scale)) . V[j] over the keys
// j in [lo, hi) (the host applies causality, kv_len and the sliding window, as key_range), where
// cap(s) = softcap * tanh(s / softcap) when softcap > 0. As unicorn_kernels::attention::attention
// for n_q = 1.
//
// One workgroup per query head. Keys go in chunks of WG, one key per invocation for the score;
// the softmax is online (running maximum and sum, earlier terms rescaled when the maximum grows),
// so any number of keys fits; each invocation accumulates the output dimensions tid, tid + WG, ...
// The output is written over the query (binding 0), which the workgroup has read first.
//
// Compiled with and without USE_SUBGROUP (the reductions).

layout(std430, binding = 0) buffer QO { float qo[]; };
layout(std430, binding = 1) readonly buffer K { uint kdata[]; };
layout(std430, binding = 2) readonly buffer V { uint vdata[]; };

layout(push_constant) uniform Params {
    uint group;     // n_head / n_kv_head
    uint head_dim;  // even, at most MAX_HD
    uint n_ctx;
    uint lo;
    uint hi;
    float scale;
    float softcap;  // 0: none
} p;

#include "common.glsl"

#define MAX_HD 512u
// Output dimensions per invocation: WG is at least 64.
#define ACC (MAX_HD / 64u)

shared float q_sh[MAX_HD];
shared float p_sh[WG];


void main() {
    uint h = gl_WorkGroupID.x;
    uint tid = gl_LocalInvocationID.x;
    uint hd = p.head_dim;
    uint qbase = h * hd;
    for (uint d = tid; d < hd; d += WG) {
        q_sh[d] = qo[qbase + d];
    }
    barrier();
    uint g = h / p.group;
    uint kvbase = g * p.n_ctx * hd; // element offset of KV head g, position 0
    float m = uintBitsToFloat(0xFF800000u); // running maximum, -inf
    float sum = 0.0;
    float acc[ACC];
    for (uint c = 0u; c < ACC; ++c) {
        acc[c] = 0.0;
    }
    for (uint base = p.lo; base < p.hi; base += WG) {
        uint j = base + tid;
        float s = uintBitsToFloat(0xFF800000u);
        if (j < p.hi) {
            uint w = (kvbase + j * hd) >> 1; // hd is even: rows start on a word
            float dot_ = 0.0;
            for (uint d2 = 0u; d2 < hd / 2u; ++d2) {
                vec2 kk = unpackHalf2x16(kdata[w + d2]);
                dot_ += q_sh[2u * d2] * kk.x + q_sh[2u * d2 + 1u] * kk.y;
            }
            s = dot_ * p.scale;
            if (p.softcap > 0.0) {
                // tanh(10) is 1 in f32; the clamp keeps exp-based tanh implementations from
                // inf / inf.
                s = p.softcap * tanh(clamp(s / p.softcap, -10.0, 10.0));
            }
        }
        float m_new = max(m, wg_max(s));
        float alpha = exp_acc(m - m_new); // 0 while m is -inf
        float e = j < p.hi ? exp_acc(s - m_new) : 0.0;
        sum = sum * alpha + wg_sum(e);
        m = m_new;
        p_sh[tid] = e;
        barrier();
        uint n = min(WG, p.hi - base);
        for (uint c = 0u; c < ACC; ++c) {
            uint d = tid + c * WG;
            if (d < hd) {
                float a = acc[c] * alpha;
                uint vw = kvbase + base * hd + d; // element of V[base][d]
                uint sh = (d & 1u) * 16u;
                for (uint jj = 0u; jj < n; ++jj) {
                    uint ve = vw + jj * hd;
                    a += p_sh[jj] * f16_to_f32(vdata[ve >> 1] >> sh);
                }
                acc[c] = a;
            }
        }
        barrier();
    }
    float inv = p.hi > p.lo ? 1.0 / sum : 0.0;
    for (uint c = 0u; c < ACC; ++c) {
        uint d = tid + c * WG;
        if (d < hd) {
            qo[qbase + d] = acc[c] * inv;
        }
    }
}

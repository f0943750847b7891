#version 450
// Attention of `n_q` query tokens (grid y), `n_head` query heads each (grid x), over one layer of
// a context's KV cache: K at element `kbase`, V at `vbase` of the cache buffer, each
// `n_kv_head x n_ctx x head_dim`, head-major (unicorn_kernels::attention's layout), f16 or, with
// KV_F32, f32. Query head h reads KV head h / group. For query t at position pos0 + t,
// out = softmax_j(cap(q . K[j] * scale)) . V[j] over the keys j in [lo, hi), as
// unicorn_kernels::attention's key_range: hi = min(pos + 1, kv_len) when causal (else kv_len),
// lo = pos + 1 - window with a sliding window (else 0); cap(s) = softcap * tanh(s / softcap)
// when softcap > 0. No visible key gives zeros. Queries and outputs are `n_q x n_head x head_dim`
// starting at value `qoff` of their buffers.
//
// One workgroup per (query head, token). Keys go in chunks of WG, one key per invocation for the
// score; the softmax is online (running maximum and sum, earlier terms rescaled when the maximum
// grows), so any number of keys fits; each invocation accumulates the output dimensions tid,
// tid + WG, ...
//
// Compiled with and without USE_SUBGROUP (the reductions), and with and without KV_F32.

layout(std430, binding = 0) readonly buffer Q { float qdata[]; };
layout(std430, binding = 1) readonly buffer KV { uint kv[]; };
layout(std430, binding = 2) writeonly buffer O { float odata[]; };

layout(push_constant) uniform Params {
    uint group;     // n_head / n_kv_head
    uint head_dim;  // even, at most MAX_HD
    uint n_ctx;
    uint kbase;     // elements
    uint vbase;
    uint qoff;      // values
    uint pos0;
    uint kv_len;
    uint causal;    // 0 or 1
    uint window;    // 0: none
    float scale;
    float softcap;  // 0: none
} p;

#include "common.glsl"

#define MAX_HD 512u
// Output dimensions per invocation: WG is at least 64.
#define ACC (MAX_HD / 64u)

shared float q_sh[MAX_HD];
shared float p_sh[WG];

// Value `e` (an element index) of the cache.
float kv_at(uint e) {
#ifdef KV_F32
    return uintBitsToFloat(kv[e]);
#else
    return f16_to_f32(kv[e >> 1] >> ((e & 1u) * 16u));
#endif
}

void main() {
    uint h = gl_WorkGroupID.x;
    uint n_head = gl_NumWorkGroups.x;
    uint t = gl_WorkGroupID.y;
    uint tid = gl_LocalInvocationID.x;
    uint hd = p.head_dim;
    uint qbase = p.qoff + (t * n_head + h) * hd;
    for (uint d = tid; d < hd; d += WG) {
        q_sh[d] = qdata[qbase + d];
    }
    barrier();
    uint qpos = p.pos0 + t;
    uint hi = p.causal != 0u ? min(qpos + 1u, p.kv_len) : p.kv_len;
    uint lo = (p.window != 0u && qpos + 1u > p.window) ? qpos + 1u - p.window : 0u;
    hi = max(hi, lo);
    uint g = h / p.group;
    uint krow = p.kbase + g * p.n_ctx * hd; // element of K[g][0][0]
    uint vrow = p.vbase + g * p.n_ctx * hd;
    float m = uintBitsToFloat(0xFF800000u); // running maximum, -inf
    float sum = 0.0;
    float acc[ACC];
    for (uint c = 0u; c < ACC; ++c) {
        acc[c] = 0.0;
    }
    for (uint base = lo; base < hi; base += WG) {
        uint j = base + tid;
        float s = uintBitsToFloat(0xFF800000u);
        if (j < hi) {
            uint e = krow + j * hd;
            float dot_ = 0.0;
#ifdef KV_F32
            for (uint d = 0u; d < hd; ++d) {
                dot_ += q_sh[d] * uintBitsToFloat(kv[e + d]);
            }
#else
            uint w = e >> 1; // hd and kbase are even: rows start on a word
            for (uint d2 = 0u; d2 < hd / 2u; ++d2) {
                vec2 kk = unpackHalf2x16(kv[w + d2]);
                dot_ += q_sh[2u * d2] * kk.x + q_sh[2u * d2 + 1u] * kk.y;
            }
#endif
            s = dot_ * p.scale;
            if (p.softcap > 0.0) {
                // tanh(10) is 1 in f32; the clamp keeps exp-based tanh implementations from
                // inf / inf.
                s = p.softcap * tanh(clamp(s / p.softcap, -10.0, 10.0));
            }
        }
        float m_new = max(m, wg_max(s));
        float alpha = exp_acc(m - m_new); // 0 while m is -inf
        float ex = j < hi ? exp_acc(s - m_new) : 0.0;
        sum = sum * alpha + wg_sum(ex);
        m = m_new;
        p_sh[tid] = ex;
        barrier();
        uint n = min(WG, hi - base);
        for (uint c = 0u; c < ACC; ++c) {
            uint d = tid + c * WG;
            if (d < hd) {
                float a = acc[c] * alpha;
                uint ve = vrow + base * hd + d; // element of V[g][base][d]
                for (uint jj = 0u; jj < n; ++jj) {
                    a += p_sh[jj] * kv_at(ve + jj * hd);
                }
                acc[c] = a;
            }
        }
        barrier();
    }
    float inv = hi > lo ? 1.0 / sum : 0.0;
    for (uint c = 0u; c < ACC; ++c) {
        uint d = tid + c * WG;
        if (d < hd) {
            odata[qbase + d] = acc[c] * inv;
        }
    }
}

// Super-block decoding of the k-quants (256 weights per block), bit-for-bit the layouts and
// dequantization of kernels/src/kquants.rs (ggml's block_q2_K ... block_q6_K). Included by
// dequant.glsl for FORMAT_Q2_K ... FORMAT_Q6_K; needs common.glsl with HAVE_WDATA.
//
// The decode unit is `dequant8(b, e0, lo, hi)`: from the super-block at byte offset `b`, the eight
// consecutive elements e0..e0+7 (e0 a multiple of 8, so all eight share one scale) into `lo`
// (e0..e0+3) and `hi` (e0+4..e0+7). Defines for the includer: QUANT 2, BLOCK_BYTES.

#define QUANT 2

// The byte at byte offset `off`, 0..255.
uint ld_u8(uint off) {
    return (wdata[off >> 2] >> ((off & 3u) * 8u)) & 0xFFu;
}

// The 2-bit fields of the 8 bytes at `off` (Q2_K/Q3_K `qs`) at bit `sh`.
void bits2x8(uint off, uint sh, out uvec4 a, out uvec4 c) {
    a = (bytes4(ld_u32(off)) >> sh) & 3u;
    c = (bytes4(ld_u32(off + 4u)) >> sh) & 3u;
}

#if defined(FORMAT_Q4_K) || defined(FORMAT_Q5_K)
// ggml's get_scale_min_k4: the 6-bit scale (x) and minimum (y) of sub-block j (0..7) from the 12
// scale bytes at `sb`.
uvec2 scale_min_k4(uint sb, uint j) {
    if (j < 4u) {
        return uvec2(ld_u8(sb + j) & 63u, ld_u8(sb + j + 4u) & 63u);
    }
    uint q4 = ld_u8(sb + j + 4u);
    return uvec2((q4 & 0xFu) | ((ld_u8(sb + j - 4u) >> 6u) << 4u),
                 (q4 >> 4u) | ((ld_u8(sb + j) >> 6u) << 4u));
}
#endif

#if defined(FORMAT_Q2_K)
// scales[16] (low nibble scale, high nibble min, per 16), qs[64], d: f16, dmin: f16.
// value = d * (sc & 15) * q - dmin * (sc >> 4); element e is bits 2((e/32)%4) of qs[32(e/128)+e%32]
#define BLOCK_BYTES 84u
void dequant8(uint b, uint e0, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b + 80u));
    float dmin = f16_to_f32(ld_u16(b + 82u));
    uint sc = ld_u8(b + (e0 >> 4u));
    float dl = d * float(sc & 0xFu);
    float ml = dmin * float(sc >> 4u);
    uvec4 qa;
    uvec4 qb;
    bits2x8(b + 16u + 32u * (e0 >> 7u) + (e0 & 31u), 2u * ((e0 >> 5u) & 3u), qa, qb);
    lo = dl * vec4(qa) - ml;
    hi = dl * vec4(qb) - ml;
}

#elif defined(FORMAT_Q3_K)
// hmask[32], qs[64] (low two bits, as Q2_K), scales[12] (sixteen 6-bit scales, bias 32), d: f16.
// value = d * (sc - 32) * (q - (high bit of e set ? 0 : 4)); high bit: bit e/32 of hmask[e%32]
#define BLOCK_BYTES 110u
void dequant8(uint b, uint e0, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b + 108u));
    uint j = e0 >> 4u;
    uint s_lo = j < 8u ? ld_u8(b + 96u + j) & 0xFu : ld_u8(b + 96u + j - 8u) >> 4u;
    uint s_hi = (ld_u8(b + 104u + (j & 3u)) >> (2u * (j >> 2u))) & 3u;
    float dl = d * float(int(s_lo | (s_hi << 4u)) - 32);
    uvec4 qa;
    uvec4 qb;
    bits2x8(b + 32u + 32u * (e0 >> 7u) + (e0 & 31u), 2u * ((e0 >> 5u) & 3u), qa, qb);
    uint hsh = e0 >> 5u;
    uint hm = b + (e0 & 31u);
    uvec4 ha = (bytes4(ld_u32(hm)) >> hsh) & 1u;
    uvec4 hb = (bytes4(ld_u32(hm + 4u)) >> hsh) & 1u;
    lo = dl * (vec4(qa) - 4.0 * vec4(1u - ha));
    hi = dl * (vec4(qb) - 4.0 * vec4(1u - hb));
}

#elif defined(FORMAT_Q4_K)
// d: f16, dmin: f16, scales[12] (get_scale_min_k4), qs[128]: element 64g + l is the low nibble
// of qs[32g + l], 64g + 32 + l its high nibble. value = d * sc * q - dmin * m
#define BLOCK_BYTES 144u
void dequant8(uint b, uint e0, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b));
    float dmin = f16_to_f32(ld_u16(b + 2u));
    uint j = e0 >> 5u;
    uvec2 sm = scale_min_k4(b + 4u, j);
    float dl = d * float(sm.x);
    float ml = dmin * float(sm.y);
    uint qo = b + 16u + 32u * (e0 >> 6u) + (e0 & 31u);
    uint sh = (j & 1u) * 4u;
    lo = dl * vec4((bytes4(ld_u32(qo)) >> sh) & 0xFu) - ml;
    hi = dl * vec4((bytes4(ld_u32(qo + 4u)) >> sh) & 0xFu) - ml;
}

#elif defined(FORMAT_Q5_K)
// As Q4_K with qh[32] before qs: bit j of qh[e % 32] is bit 4 of element e of sub-block j.
#define BLOCK_BYTES 176u
void dequant8(uint b, uint e0, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b));
    float dmin = f16_to_f32(ld_u16(b + 2u));
    uint j = e0 >> 5u;
    uvec2 sm = scale_min_k4(b + 4u, j);
    float dl = d * float(sm.x);
    float ml = dmin * float(sm.y);
    uint qo = b + 48u + 32u * (e0 >> 6u) + (e0 & 31u);
    uint sh = (j & 1u) * 4u;
    uint ho = b + 16u + (e0 & 31u);
    uvec4 qa = ((bytes4(ld_u32(qo)) >> sh) & 0xFu) | (((bytes4(ld_u32(ho)) >> j) & 1u) << 4u);
    uvec4 qb =
        ((bytes4(ld_u32(qo + 4u)) >> sh) & 0xFu) | (((bytes4(ld_u32(ho + 4u)) >> j) & 1u) << 4u);
    lo = dl * vec4(qa) - ml;
    hi = dl * vec4(qb) - ml;
}

#elif defined(FORMAT_Q6_K)
// ql[128], qh[64], scales[16] (i8, per 16), d: f16. For element e = 128h + 32k + l: low nibble
// (k < 2) or high nibble (k >= 2) of ql[64h + 32(k % 2) + l], high bits 2k..2k+1 of
// qh[32h + l]. value = d * sc * (q - 32)
#define BLOCK_BYTES 210u
void dequant8(uint b, uint e0, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b + 208u));
    int sc = int(ld_u8(b + 192u + (e0 >> 4u)) << 24u) >> 24;
    float dl = d * float(sc);
    uint h = e0 >> 7u;
    uint k = (e0 >> 5u) & 3u;
    uint l = e0 & 31u;
    uint lo_off = b + 64u * h + 32u * (k & 1u) + l;
    uint lsh = k < 2u ? 0u : 4u;
    uint hi_off = b + 128u + 32u * h + l;
    uint hsh = 2u * k;
    uvec4 qa = ((bytes4(ld_u32(lo_off)) >> lsh) & 0xFu)
        | (((bytes4(ld_u32(hi_off)) >> hsh) & 3u) << 4u);
    uvec4 qb = ((bytes4(ld_u32(lo_off + 4u)) >> lsh) & 0xFu)
        | (((bytes4(ld_u32(hi_off + 4u)) >> hsh) & 3u) << 4u);
    lo = dl * (vec4(qa) - 32.0);
    hi = dl * (vec4(qb) - 32.0);
}

#else
#error "dequant_k.glsl: define one of FORMAT_Q2_K ... FORMAT_Q6_K"
#endif

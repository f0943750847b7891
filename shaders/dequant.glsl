// Block decoding of the GGUF formats, one per FORMAT_* define, bit-for-bit the layouts of
// kernels/src/formats.rs (ggml's block_q4_0 ... block_q8_0). Needs common.glsl with HAVE_WDATA.
//
// Every format here has 32 elements per block, and byte j of a block's quants holds elements j and
// j + 16 (Q4/Q5: low and high nibble; Q8_0 stores them 16 bytes apart). So the common decode unit
// is `dequant8(b, i, lo, hi)`: from the block at byte offset `b`, elements i..i+3 into `lo` and
// elements 16+i..16+i+3 into `hi`, for i in {0, 4, 8, 12}.
//
// Defines for the includer: QUANT (1 for these 32-element block formats, 2 for the 256-element
// k-quants of dequant_k.glsl), BLOCK_BYTES, and for F32/F16/BF16 `ld_elem`.

#if defined(FORMAT_Q4_0)
// d: f16, qs: 16 bytes. value = (q - 8) * d
#define QUANT 1
#define BLOCK_BYTES 18u
void dequant8(uint b, uint i, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b));
    uvec4 q = bytes4(ld_u32(b + 2u + i));
    lo = (vec4(q & 0xFu) - 8.0) * d;
    hi = (vec4(q >> 4u) - 8.0) * d;
}

#elif defined(FORMAT_Q4_1)
// d: f16, m: f16, qs: 16 bytes. value = q * d + m
#define QUANT 1
#define BLOCK_BYTES 20u
void dequant8(uint b, uint i, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b));
    float m = f16_to_f32(ld_u16(b + 2u));
    uvec4 q = bytes4(ld_u32(b + 4u + i));
    lo = vec4(q & 0xFu) * d + m;
    hi = vec4(q >> 4u) * d + m;
}

#elif defined(FORMAT_Q5_0)
// d: f16, qh: u32 (bit j = bit 4 of element j), qs: 16 bytes. value = (q - 16) * d
#define QUANT 1
#define BLOCK_BYTES 22u
void dequant8(uint b, uint i, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b));
    uint qh = ld_u32(b + 2u);
    uvec4 q = bytes4(ld_u32(b + 6u + i));
    uvec4 sh = uvec4(0u, 1u, 2u, 3u) + i;
    uvec4 hl = ((uvec4(qh) >> sh) & 1u) << 4u;
    uvec4 hh = ((uvec4(qh) >> (sh + 16u)) & 1u) << 4u;
    lo = (vec4((q & 0xFu) | hl) - 16.0) * d;
    hi = (vec4((q >> 4u) | hh) - 16.0) * d;
}

#elif defined(FORMAT_Q5_1)
// d: f16, m: f16, qh: u32, qs: 16 bytes. value = q * d + m
#define QUANT 1
#define BLOCK_BYTES 24u
void dequant8(uint b, uint i, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b));
    float m = f16_to_f32(ld_u16(b + 2u));
    uint qh = ld_u32(b + 4u);
    uvec4 q = bytes4(ld_u32(b + 8u + i));
    uvec4 sh = uvec4(0u, 1u, 2u, 3u) + i;
    uvec4 hl = ((uvec4(qh) >> sh) & 1u) << 4u;
    uvec4 hh = ((uvec4(qh) >> (sh + 16u)) & 1u) << 4u;
    lo = vec4((q & 0xFu) | hl) * d + m;
    hi = vec4((q >> 4u) | hh) * d + m;
}

#elif defined(FORMAT_Q8_0)
// d: f16, qs: 32 signed bytes. value = q * d
#define QUANT 1
#define BLOCK_BYTES 34u
vec4 sbytes4(uint q) {
    ivec4 v = ivec4(uvec4(q) << uvec4(24u, 16u, 8u, 0u)) >> 24;
    return vec4(v);
}
void dequant8(uint b, uint i, out vec4 lo, out vec4 hi) {
    float d = f16_to_f32(ld_u16(b));
    lo = sbytes4(ld_u32(b + 2u + i)) * d;
    hi = sbytes4(ld_u32(b + 18u + i)) * d;
}

#elif defined(FORMAT_F16)
#define QUANT 0
float ld_elem(uint row, uint e) {
    return f16_to_f32(ld_u16(row + 2u * e));
}

#elif defined(FORMAT_BF16)
// The high half of an f32, little-endian.
#define QUANT 0
float ld_elem(uint row, uint e) {
    return uintBitsToFloat(ld_u16(row + 2u * e) << 16u);
}

#elif defined(FORMAT_Q2_K) || defined(FORMAT_Q3_K) || defined(FORMAT_Q4_K) || defined(FORMAT_Q5_K) \
    || defined(FORMAT_Q6_K)
#include "dequant_k.glsl"

#elif defined(FORMAT_F32)
#define QUANT 0
float ld_elem(uint row, uint e) {
    return uintBitsToFloat(ld_u32(row + 4u * e));
}

#else
#error "dequant.glsl: define one FORMAT_*"
#endif

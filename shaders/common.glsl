// Shared by every compute shader in unicorn: the workgroup size, f16 conversions, the
// workgroup-wide sum and maximum, an accurate exp, and byte access to a tightly packed `uint`
// weight buffer.
//
// Include after the shader's buffer declarations. Defines the includer may set:
//   USE_SUBGROUP  reduce with subgroupAdd (GL_KHR_shader_subgroup_arithmetic); the host compiles
//                 this variant only for devices that report arithmetic subgroup ops in compute.
//   HAVE_WDATA    the shader declares `uint wdata[]`; enables the byte loaders below.
//
// The subgroup size is never assumed: the reduction uses gl_NumSubgroups and gl_SubgroupID, which
// hold whatever size the driver chose for this dispatch.

#ifdef USE_SUBGROUP
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif

// The workgroup size, a specialization constant the host sets (a power of two and a multiple of
// the device's reported subgroup size).
layout(constant_id = 0) const uint WG = 64;
layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

shared float red_buf[WG];

// The sum of `v` over the workgroup, returned to every invocation. Call in uniform control flow.
float wg_sum(float v) {
#ifdef USE_SUBGROUP
    v = subgroupAdd(v);
    if (subgroupElect()) {
        red_buf[gl_SubgroupID] = v;
    }
    barrier();
    float s = 0.0;
    for (uint i = 0u; i < gl_NumSubgroups; ++i) {
        s += red_buf[i];
    }
    barrier();
    return s;
#else
    uint tid = gl_LocalInvocationID.x;
    red_buf[tid] = v;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            red_buf[tid] += red_buf[tid + s];
        }
        barrier();
    }
    float r = red_buf[0];
    barrier();
    return r;
#endif
}

// The maximum of `v` over the workgroup, returned to every invocation. Call in uniform control
// flow.
float wg_max(float v) {
#ifdef USE_SUBGROUP
    v = subgroupMax(v);
    if (subgroupElect()) {
        red_buf[gl_SubgroupID] = v;
    }
    barrier();
    float m = red_buf[0];
    for (uint i = 1u; i < gl_NumSubgroups; ++i) {
        m = max(m, red_buf[i]);
    }
    barrier();
    return m;
#else
    uint tid = gl_LocalInvocationID.x;
    red_buf[tid] = v;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1u) {
        if (tid < s) {
            red_buf[tid] = max(red_buf[tid], red_buf[tid + s]);
        }
        barrier();
    }
    float r = red_buf[0];
    barrier();
    return r;
#endif
}

// exp(x) within a few ulp for any x. The device's exp is exp2(x * log2(e)), whose rounded
// product costs about |x| ulp (1e-6 relative at x = -16); here x = k ln2 + r with |r| <= ln2 / 2
// (ln2 in two parts, fdlibm's, the first with 15 significant bits so k * ln2_hi is exact), and
// exp(x) = 2^k exp(r).
float exp_acc(float x) {
    if (x < -104.0) {
        return 0.0; // below the smallest subnormal; also -inf
    }
    if (x > 89.0) {
        return uintBitsToFloat(0x7f800000u); // +inf
    }
    float k = round(x * 1.4426950408889634);
    precise float r = x - k * uintBitsToFloat(0x3f317200u);
    r = r - k * uintBitsToFloat(0x35bfbe8eu);
    return ldexp(exp(r), int(k));
}

// An IEEE half in the low 16 bits of `bits`, as f32.
float f16_to_f32(uint bits) {
    return unpackHalf2x16(bits & 0xFFFFu).x;
}

// `f` as an IEEE half (low 16 bits), rounded to nearest even as the CPU's f32 -> f16
// conversion (half::f16::from_f32) does: overflow to infinity, subnormals, NaN kept NaN. Integer
// arithmetic, so it does not depend on how the device rounds in packHalf2x16.
uint f32_to_f16(float f) {
    uint x = floatBitsToUint(f);
    uint sign = (x >> 16) & 0x8000u;
    uint ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) {
        return sign | (ax > 0x7F800000u ? 0x7E00u | ((ax >> 13) & 0x3FFu) : 0x7C00u);
    }
    if (ax >= 0x477FF000u) {
        return sign | 0x7C00u; // rounds to 65520 or more
    }
    if (ax >= 0x38800000u) {
        // Normal: rebias the exponent (127 -> 15), round the 13 dropped mantissa bits.
        uint h = (ax - 0x38000000u) >> 13;
        uint rem = ax & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) != 0u)) {
            h += 1u;
        }
        return sign | h;
    }
    if (ax < 0x33000000u) {
        return sign; // below 2^-25 (and 2^-25 itself ties to the even 0)
    }
    // Subnormal half: units of 2^-24, the significand shifted right by 126 - exponent (14..24).
    uint m = (ax & 0x7FFFFFu) | 0x800000u;
    uint s = 126u - (ax >> 23);
    uint h = m >> s;
    uint rem = m & ((1u << s) - 1u);
    uint halfway = 1u << (s - 1u);
    if (rem > halfway || (rem == halfway && (h & 1u) != 0u)) {
        h += 1u;
    }
    return sign | h;
}

#ifdef HAVE_WDATA
// Byte access to `wdata`. GGUF blocks are 18..34 bytes, so fields are not 4-byte aligned; every
// load reads only the words holding the bytes asked for (the host pads buffers to whole words).

// The 4 bytes at byte offset `off`, little-endian.
uint ld_u32(uint off) {
    uint w = off >> 2;
    uint sh = (off & 3u) * 8u;
    uint lo = wdata[w];
    if (sh == 0u) {
        return lo;
    }
    return (lo >> sh) | (wdata[w + 1u] << (32u - sh));
}

// The 2 bytes at byte offset `off`, little-endian, in the low 16 bits.
uint ld_u16(uint off) {
    uint sh = (off & 3u) * 8u;
    if (sh <= 16u) {
        return (wdata[off >> 2] >> sh) & 0xFFFFu;
    }
    return ld_u32(off) & 0xFFFFu;
}

// The 4 bytes of `q` as four values 0..255.
uvec4 bytes4(uint q) {
    return (uvec4(q) >> uvec4(0u, 8u, 16u, 24u)) & 0xFFu;
}
#endif

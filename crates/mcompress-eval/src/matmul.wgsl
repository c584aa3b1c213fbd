// y[n, m] = x[n, k] · W[m, k]ᵀ (+ bias), W dense f32 or straight from mcompress's packed
// quantized layout (docs/quantized-layout.md) with its per-(row, group) scales and zero points:
// each weight is decoded as it is loaded into workgroup memory, so the matrix never exists in f32.
//
// bits = 32: W is f32 (bit patterns in u32 words), row-major [m, k].
// kind = 1:  FP8 E4M3 codes, 8 bits each in the same words, no offset: value = e4m3(code) * scale.
// kind = 2:  FP4 E2M1 codes (NVFP4/MXFP4), 4 bits each, no offset: value = e2m1(code) * scale, the
//            scale already effective (NVFP4's FP8 group scale over its global scale).
// bits ≤ 8:  W is I32 words [m, row_words], compressed-tensors' dense packing: code c of a row
//            occupies bits c·bits .. (c+1)·bits of the row's bit stream (a 3-bit code may straddle
//            two words), stored unsigned with offset 2^(bits-1).
// Value = (code - zero_point[g]) * scale[g], g = r * groups + c / group_len: the formula of
// mcompress_format::quant::dequant_value, so the CPU and GPU paths decode identical f32 weights.
//
// Tiling: a 16 × 16 workgroup computes a 64 × 64 block of y, each invocation a 4 × 4 register
// block (rows ly + 16i, columns lx + 16j); K advances 32 at a time through workgroup memory, so
// each decoded weight and each x value is used 64 times per load and barriers are rare (llvmpipe
// pays for every barrier).

struct Params {
    n: u32,
    k: u32,
    m: u32,
    bits: u32,
    kind: u32, // 0: integer codes; 1: FP8 E4M3 codes; 2: FP4 E2M1 codes
    groups: u32,
    group_len: u32,
    row_words: u32,
    has_zp: u32,
    has_bias: u32,
    out_stride: u32,
    col0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> scale: array<f32>;
@group(0) @binding(4) var<storage, read> zp: array<i32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

const TM: u32 = 64u; // rows of x per workgroup
const TN: u32 = 64u; // rows of W (columns of y) per workgroup
const TK: u32 = 32u; // k per step

var<workgroup> xs: array<array<f32, 33>, 64>;
var<workgroup> ws: array<array<f32, 33>, 64>;

// FP8 E4M3FN code → f32 (mcompress_format::quant::fp8::e4m3_to_f32): bias 7, subnormals at
// 2^-9 steps; the NaN codes are refused when a bundle is read.
fn e4m3(u: u32) -> f32 {
    let s = select(1.0, -1.0, (u & 0x80u) != 0u);
    let e = (u >> 3u) & 0xfu;
    let m = f32(u & 7u);
    if e == 0u {
        return s * m * (1.0 / 512.0);
    }
    // 2^(e - 7), built from its bits so it is exact on every device.
    return s * (1.0 + m / 8.0) * bitcast<f32>((e + 120u) << 23u);
}

// FP4 E2M1 code → f32 (mcompress_format::quant::fp4::e2m1_to_f32): magnitudes 0, .5, 1, 1.5, 2,
// 3, 4, 6 by index, sign in bit 3. Exact: m/2 for index < 4, else 2^(i/2 - 1) · (1 + (i & 1)/2).
fn e2m1(u: u32) -> f32 {
    let s = select(1.0, -1.0, (u & 8u) != 0u);
    let i = u & 7u;
    if i < 4u {
        return s * f32(i) * 0.5;
    }
    return s * f32(1u << ((i >> 1u) - 1u)) * (1.0 + f32(i & 1u) * 0.5);
}

fn load_w(r: u32, c: u32) -> f32 {
    if p.bits == 32u {
        return bitcast<f32>(w[r * p.k + c]);
    }
    let bit = c * p.bits;
    let wi = r * p.row_words + bit / 32u;
    let shift = bit % 32u;
    var u = w[wi] >> shift;
    if shift + p.bits > 32u {
        u = u | (w[wi + 1u] << (32u - shift));
    }
    u = u & ((1u << p.bits) - 1u);
    let g0 = r * p.groups + c / p.group_len;
    if p.kind == 1u {
        return e4m3(u) * scale[g0];
    }
    if p.kind == 2u {
        return e2m1(u) * scale[g0];
    }
    let q = i32(u) - (1 << (p.bits - 1u));
    let g = g0;
    var z = 0;
    if p.has_zp != 0u {
        z = zp[g];
    }
    return f32(q - z) * scale[g];
}

@compute @workgroup_size(8, 8)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    let t = lid.y * 8u + lid.x;
    var acc: array<array<vec4<f32>, 2>, 8>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var s = 0u; s < 32u; s++) {
            let e = t + s * 64u;
            let r = e / TK;
            let kk = e % TK;
            let c = k0 + kk;
            var xv = 0.0;
            if row0 + r < p.n && c < p.k {
                xv = x[(row0 + r) * p.k + c];
            }
            xs[r][kk] = xv;
            var wv = 0.0;
            if col0 + r < p.m && c < p.k {
                wv = load_w(col0 + r, c);
            }
            ws[r][kk] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let w0 = vec4<f32>(ws[lid.x][kk], ws[lid.x + 8u][kk], ws[lid.x + 16u][kk], ws[lid.x + 24u][kk]);
            let w1 = vec4<f32>(ws[lid.x + 32u][kk], ws[lid.x + 40u][kk], ws[lid.x + 48u][kk], ws[lid.x + 56u][kk]);
            for (var i = 0u; i < 8u; i++) {
                let xv = xs[lid.y + 8u * i][kk];
                acc[i][0] += xv * w0;
                acc[i][1] += xv * w1;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 8u; i++) {
        let row = row0 + lid.y + 8u * i;
        if row >= p.n {
            break;
        }
        for (var j = 0u; j < 8u; j++) {
            let col = col0 + lid.x + 8u * j;
            if col < p.m {
                var b = 0.0;
                if p.has_bias != 0u {
                    b = bias[col];
                }
                y[row * p.out_stride + p.col0 + col] = acc[i][j / 4u][j % 4u] + b;
            }
        }
    }
}

// y[n, m] = x[n, k] · W[m, k]ᵀ (+ bias), W dense f32 or straight from mcompress's packed
// quantized layout (docs/quantized-layout.md) with its per-(row, group) scales and zero points:
// each weight is decoded as it is loaded into workgroup memory, so the matrix never exists in f32.
//
// bits = 32: W is f32 (bit patterns in u32 words), row-major [m, k].
// bits = 8:  W is I8 codes, row-major bytes [m, k] (rows not word-aligned), 4 per u32, little-endian.
// bits < 8:  W is I32 words [m, row_words]; code c of a row sits in word c / pf at bit (c % pf) * bits,
//            stored unsigned with offset 2^(bits-1).
// Value = (code - zero_point[g]) * scale[g], g = r * groups + c / group_len: the formula of
// mcompress_passes::quant::dequant_value, so the CPU and GPU paths decode identical f32 weights.
//
// Tiling: a 16 × 16 workgroup computes a 16-row × 64-column block of y; each invocation holds
// four accumulators (columns lid.x, +16, +32, +48), so every x value loaded into workgroup memory
// is used four times.

struct Params {
    n: u32,
    k: u32,
    m: u32,
    bits: u32,
    pf: u32,
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

const T: u32 = 16u;
const C: u32 = 64u;

var<workgroup> xs: array<array<f32, 17>, 16>;
var<workgroup> ws: array<array<f32, 17>, 64>;

fn load_w(r: u32, c: u32) -> f32 {
    if p.bits == 32u {
        return bitcast<f32>(w[r * p.k + c]);
    }
    var q: i32;
    if p.bits == 8u {
        let idx = r * p.k + c;
        let b = (w[idx / 4u] >> ((idx % 4u) * 8u)) & 0xffu;
        q = i32(b) - select(0, 256, b >= 128u);
    } else {
        let word = w[r * p.row_words + c / p.pf];
        let u = (word >> ((c % p.pf) * p.bits)) & ((1u << p.bits) - 1u);
        q = i32(u) - (1 << (p.bits - 1u));
    }
    let g = r * p.groups + c / p.group_len;
    var z = 0;
    if p.has_zp != 0u {
        z = zp[g];
    }
    return f32(q - z) * scale[g];
}

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.y * T + lid.y;
    let col_base = wid.x * C;
    var acc = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += T) {
        let kc = k0 + lid.x;
        var xv = 0.0;
        if row < p.n && kc < p.k {
            xv = x[row * p.k + kc];
        }
        xs[lid.y][lid.x] = xv;
        for (var j = 0u; j < 4u; j++) {
            let wl = lid.y + j * T;
            let wr = col_base + wl;
            var wv = 0.0;
            if wr < p.m && kc < p.k {
                wv = load_w(wr, kc);
            }
            ws[wl][lid.x] = wv;
        }
        workgroupBarrier();
        for (var i = 0u; i < T; i++) {
            let xi = xs[lid.y][i];
            acc += xi * vec4<f32>(ws[lid.x][i], ws[lid.x + T][i], ws[lid.x + 2u * T][i], ws[lid.x + 3u * T][i]);
        }
        workgroupBarrier();
    }
    if row < p.n {
        for (var j = 0u; j < 4u; j++) {
            let col = col_base + lid.x + j * T;
            if col < p.m {
                var b = 0.0;
                if p.has_bias != 0u {
                    b = bias[col];
                }
                y[row * p.out_stride + p.col0 + col] = acc[j] + b;
            }
        }
    }
}

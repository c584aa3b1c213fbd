//! The CPU matmuls of the eval models, on `matrixmultiply`'s packed, register-blocked sgemm
//! (AVX-512/AVX2+FMA kernels picked at run time).
//!
//! Parallelism is ours, not the library's: work is cut into fixed tiles (a tile's shape never
//! depends on the thread count) and each tile is one single-threaded sgemm, so every output
//! element is reduced over `k` in the same order at any `--threads` and the eval figures in a
//! report do not change with it.
#![allow(clippy::many_single_char_names)] // BLAS names: x, w, b, k, m, n

use rayon::prelude::*;

/// Output columns (weight rows) per tile. Tiles of 64 × 128 spent nearly half their time
/// packing (each input tile was packed again for every 64 weight rows); 256 × 256 runs
/// 1.5–1.9× faster on 2 cores with the same sums (each element's reduction over `k` follows the
/// library's fixed `k` blocking, whatever the tile).
const TILE_M: usize = 256;
/// Input rows per tile.
const TILE_N: usize = 256;

/// Row and column strides of a matrix view.
#[derive(Clone, Copy, Debug)]
pub struct Strides {
    /// Elements between consecutive rows.
    pub row: usize,
    /// Elements between consecutive columns.
    pub col: usize,
}

impl Strides {
    /// Row-major with `cols` columns.
    pub fn row_major(cols: usize) -> Self {
        Strides { row: cols, col: 1 }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(cols: usize) -> Self {
        Strides { row: 1, col: cols }
    }

    fn max_index(self, rows: usize, cols: usize) -> usize {
        (rows - 1) * self.row + (cols - 1) * self.col
    }
}

/// `c[m × n] = a[m × k] · b[k × n] (+ c if accumulate)` on strided views, single-threaded.
///
/// # Panics
/// If a view reaches past its slice (checked up front), or `c`'s strides make elements alias.
#[allow(clippy::too_many_arguments)] // BLAS's shape: dims, three views with strides, beta
pub fn sgemm(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    sa: Strides,
    b: &[f32],
    sb: Strides,
    c: &mut [f32],
    sc: Strides,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(sc.row != sc.col || m == 1 || n == 1, "output strides alias");
    assert!(sc.max_index(m, n) < c.len(), "output view out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * sc.row + j * sc.col] = 0.0;
                }
            }
        }
        return;
    }
    assert!(sa.max_index(m, k) < a.len(), "left view out of bounds");
    assert!(sb.max_index(k, n) < b.len(), "right view out of bounds");
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: every element the views address lies inside its slice (checked above); `c` is
    // borrowed mutably and its strides do not alias, `a` and `b` are shared borrows that cannot
    // overlap it.
    #[allow(unsafe_code)]
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            sa.row as isize,
            sa.col as isize,
            b.as_ptr(),
            sb.row as isize,
            sb.col as isize,
            beta,
            c.as_mut_ptr(),
            sc.row as isize,
            sc.col as isize,
        );
    }
}

/// `x [n, k] · w[m, k]ᵀ + b` → `[n, m]`, in parallel over fixed tiles.
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, k: usize, m: usize) -> Vec<f32> {
    linear_tiles(x, k, m, b, |j0, j1, out: &mut Vec<f32>| {
        out.clear();
        out.extend_from_slice(&w[j0 * k..j1 * k]);
    })
}

/// `x [n, k] · Wᵀ + b` → `[n, m]` where `fill(j0, j1, buf)` writes weight rows `j0..j1`
/// (row-major, `k` each) into `buf`: dense weights copy them, packed ones decode them, so a
/// quantized matrix is only ever expanded one tile of rows (per task) at a time.
pub fn linear_tiles<F>(x: &[f32], k: usize, m: usize, b: Option<&[f32]>, fill: F) -> Vec<f32>
where
    F: Fn(usize, usize, &mut Vec<f32>) + Sync,
{
    let n = x.len() / k.max(1);
    let col_tiles = m.div_ceil(TILE_M);
    // One task per weight tile; inside it, every input row tile (the decoded tile is reused).
    let tiles: Vec<Vec<f32>> = (0..col_tiles)
        .into_par_iter()
        .map_init(Vec::new, |wbuf, t| {
            let (j0, j1) = (t * TILE_M, ((t + 1) * TILE_M).min(m));
            let bw = j1 - j0;
            fill(j0, j1, wbuf);
            let mut out = vec![0f32; n * bw];
            out.par_chunks_mut(TILE_N * bw).zip(x.par_chunks(TILE_N * k)).for_each(|(o, xr)| {
                let rows = xr.len() / k.max(1);
                sgemm(
                    (rows, k, bw),
                    xr,
                    Strides::row_major(k),
                    wbuf,
                    Strides::transposed(k),
                    o,
                    Strides::row_major(bw),
                    false,
                );
            });
            if let Some(b) = b {
                for row in out.chunks_mut(bw) {
                    for (v, bias) in row.iter_mut().zip(&b[j0..j1]) {
                        *v += bias;
                    }
                }
            }
            out
        })
        .collect();
    let mut y = vec![0f32; n * m];
    for (t, tile) in tiles.iter().enumerate() {
        let j0 = t * TILE_M;
        let bw = tile.len() / n.max(1);
        for (r, vals) in tile.chunks(bw.max(1)).enumerate() {
            y[r * m + j0..r * m + j0 + bw].copy_from_slice(vals);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], b: Option<&[f32]>, k: usize, m: usize) -> Vec<f64> {
        let n = x.len() / k;
        let mut y = vec![0f64; n * m];
        for r in 0..n {
            for j in 0..m {
                y[r * m + j] = (0..k).map(|c| f64::from(x[r * k + c]) * f64::from(w[j * k + c])).sum::<f64>()
                    + b.map_or(0.0, |b| f64::from(b[j]));
            }
        }
        y
    }

    #[test]
    fn test_linear_matches_naive() {
        // Shapes that cut tiles unevenly: 300 rows (128 + 128 + 44), 130 columns (64 + 64 + 2).
        for (n, k, m) in [(7, 19, 5), (300, 33, 130), (1, 576, 64)] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
            let w: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5).collect();
            let b: Vec<f32> = (0..m).map(|i| i as f32).collect();
            let y = linear(&x, &w, Some(&b), k, m);
            let want = naive(&x, &w, Some(&b), k, m);
            for (i, (got, want)) in y.iter().zip(&want).enumerate() {
                assert!((f64::from(*got) - want).abs() < 1e-3, "{n}x{k}x{m}: y[{i}] {got} vs {want}");
            }
        }
    }

    #[test]
    fn test_linear_is_thread_count_independent() {
        let (n, k, m) = (200, 96, 150);
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5).collect();
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 104_729 % 997) as f32 / 997.0) - 0.5).collect();
        let run = |threads| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| linear(&x, &w, None, k, m))
        };
        let one = run(1);
        for t in [2, 3, 8] {
            assert!(one.iter().zip(run(t)).all(|(a, b)| a.to_bits() == b.to_bits()), "{t} threads differ");
        }
    }

    #[test]
    fn test_sgemm_strided_views() {
        // c = a · bᵀ with a taken every other row, written into the middle columns of c.
        let a: Vec<f32> = (0..24).map(|v| v as f32).collect(); // 6 × 4
        let b: Vec<f32> = (0..12).map(|v| (v % 5) as f32).collect(); // 3 × 4
        let mut c = [-1f32; 3 * 5];
        sgemm(
            (3, 4, 3),
            &a,
            Strides { row: 8, col: 1 },
            &b,
            Strides::transposed(4),
            &mut c[1..],
            Strides::row_major(5),
            false,
        );
        for i in 0..3 {
            for j in 0..3 {
                let want: f32 = (0..4).map(|t| a[2 * i * 4 + t] * b[j * 4 + t]).sum();
                assert!((c[1 + i * 5 + j] - want).abs() < 1e-5);
            }
        }
        assert!(c[0].to_bits() == (-1f32).to_bits(), "outside the view untouched");
    }
}

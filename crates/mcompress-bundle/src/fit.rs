//! `policy = "fit"`: a GGUF type per tensor that minimises the summed weighted quantization error
//! with the file within `max-size`.
//!
//! Sensitivity: for tensor `W` (rows × in) and type `t`, the expected squared error of the
//! layer's output, `ε_t = Σ_c m_c Σ_r (W − Q_t(W))²_rc`, where `m_c = E[x_c²]` is the mean square of
//! input channel `c` over the calibration windows (the diagonal of the layer's input Hessian;
//! `m = 1` without calibration, or for tensors with no linear input). It is `E‖(W − Q_t(W))x‖²`
//! when channels are uncorrelated, summed over the layer's outputs, so a layer with many outputs
//! (the 49,152-row output head) weighs accordingly. (Measured: the relative error `ε_t / Σ m W²`
//! instead treats every tensor alike and spends too few bits on the output head; docs/gguf.md.)
//!
//! Solver: a multiple-choice knapsack (one type per tensor; minimise Σ weight·ε, bytes ≤ budget)
//! by dynamic programming over the byte budget on a grid of `GRID` cells. Each choice's size is
//! rounded *up* to whole cells, so the chosen file never exceeds the budget; the grid costs at
//! most `tensors × cell` bytes of slack.

#![allow(clippy::many_single_char_names)] // w, m, t, q, e as in the formula above

use std::collections::BTreeMap;

use mcompress_core::ggml;
use mcompress_core::gguf::{GgmlType, dequantize};

/// Cells of the budget grid.
const GRID: usize = 16_384;

/// One tensor's options.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    /// Hugging Face name.
    pub name: String,
    /// (type, bytes, relative error) per allowed type.
    pub choices: Vec<(GgmlType, u64, f64)>,
    /// Multiplier of the error in the objective (raised on retries).
    pub weight: f64,
    /// Further Hugging Face names that take the same type (the other experts of a GGUF stack,
    /// which is one tensor of one type).
    pub members: Vec<String>,
}

/// `ε_t` for each of `types` on the row-major `rows × cols` matrix `w`, channel weights `m`
/// (length `cols`) or uniform.
pub(crate) fn errors(w: &[f32], cols: usize, m: Option<&[f32]>, types: &[GgmlType]) -> Vec<f64> {
    let weight = |c: usize| m.map_or(1.0, |m| f64::from(m[c]));
    let mut deq = Vec::new();
    types
        .iter()
        .map(|&t| {
            let Some(q) = ggml::quantize(t, w) else { return f64::INFINITY };
            dequantize(t, &q, &mut deq);
            let mut e = 0f64;
            for (row, drow) in w.chunks_exact(cols).zip(deq.chunks_exact(cols)) {
                for (c, (a, b)) in row.iter().zip(drow).enumerate() {
                    let d = f64::from(a - b);
                    e += weight(c) * d * d;
                }
            }
            e
        })
        .collect()
}

/// Chooses one option per item minimising `Σ weight·ε` with `Σ bytes ≤ budget`; `None` when even
/// the smallest options do not fit.
pub(crate) fn solve(items: &[Item], budget: u64) -> Option<Vec<usize>> {
    let min_total: u64 = items.iter().map(|i| i.choices.iter().map(|c| c.1).min().unwrap_or(0)).sum();
    if min_total > budget {
        return None;
    }
    let cell = budget.div_ceil(GRID as u64).max(1);
    let cap = (budget / cell) as usize;
    let units = |b: u64| b.div_ceil(cell) as usize;
    // best[c]: least cost using at most c cells over the items so far.
    let mut best = vec![0f64; cap + 1];
    let mut picks: Vec<Vec<u16>> = Vec::with_capacity(items.len());
    for item in items {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut pick = vec![u16::MAX; cap + 1];
        for (k, &(_, bytes, err)) in item.choices.iter().enumerate() {
            let u = units(bytes);
            let cost = item.weight * err;
            if u > cap || !cost.is_finite() {
                continue;
            }
            for c in u..=cap {
                let v = best[c - u] + cost;
                // Strictly better, or equal and smaller: deterministic ties.
                if v < next[c] {
                    next[c] = v;
                    pick[c] = k as u16;
                }
            }
        }
        best = next;
        picks.push(pick);
    }
    if !best[cap].is_finite() {
        // Rounding sizes up to cells can make a barely-fitting set infeasible on the grid.
        return None;
    }
    let mut c = cap;
    let mut chosen = vec![0usize; items.len()];
    for (i, item) in items.iter().enumerate().rev() {
        let k = picks[i][c] as usize;
        chosen[i] = k;
        c -= units(item.choices[k].1);
    }
    Some(chosen)
}

/// The retry step after a failed gate: multiply the weight of the `share` most sensitive items
/// (largest weighted error at their current choice) by `factor`. Returns the names raised.
pub(crate) fn raise(items: &mut [Item], chosen: &[usize], share: f64, factor: f64) -> Vec<String> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    let cost = |i: usize| items[i].weight * items[i].choices[chosen[i]].2;
    order.sort_by(|&a, &b| cost(b).total_cmp(&cost(a)).then(a.cmp(&b)));
    let n = ((items.len() as f64 * share).ceil() as usize).clamp(1, items.len().max(1));
    let mut raised = Vec::new();
    for &i in order.iter().take(n) {
        items[i].weight *= factor;
        raised.push(items[i].name.clone());
    }
    raised
}

/// Types chosen, by name (every member of an item).
pub(crate) fn types_of(items: &[Item], chosen: &[usize]) -> BTreeMap<String, GgmlType> {
    items
        .iter()
        .zip(chosen)
        .flat_map(|(i, &k)| std::iter::once(&i.name).chain(&i.members).map(move |n| (n.clone(), i.choices[k].0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, choices: &[(u64, f64)]) -> Item {
        Item {
            name: name.into(),
            choices: choices.iter().map(|&(b, e)| (GgmlType::Q4_0, b, e)).collect(),
            weight: 1.0,
            members: Vec::new(),
        }
    }

    /// Exhaustive search over all combinations.
    fn brute(items: &[Item], budget: u64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let n: usize = items.iter().map(|i| i.choices.len()).product();
        for mut code in 0..n {
            let (mut bytes, mut cost) = (0, 0.0);
            for i in items {
                let k = code % i.choices.len();
                code /= i.choices.len();
                bytes += i.choices[k].1;
                cost += i.weight * i.choices[k].2;
            }
            if bytes <= budget && best.is_none_or(|b| cost < b) {
                best = Some(cost);
            }
        }
        best
    }

    #[test]
    fn test_solver_matches_brute_force_and_respects_budget() {
        let mut s = 3u64;
        let mut rnd = |m: u64| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (s >> 33) % m
        };
        for _ in 0..40 {
            let items: Vec<Item> = (0..5)
                .map(|i| {
                    let base = 100 + rnd(900);
                    let choices: Vec<(u64, f64)> =
                        (0..3).map(|k| (base * (k + 2), 1.0 / (k as f64 + 1.0) * (1 + rnd(9)) as f64)).collect();
                    item(&format!("t{i}"), &choices)
                })
                .collect();
            let min: u64 = items.iter().map(|i| i.choices[0].1).sum();
            let budget = min + rnd(min * 2);
            let got = solve(&items, budget).unwrap();
            let bytes: u64 = items.iter().zip(&got).map(|(i, &k)| i.choices[k].1).sum();
            assert!(bytes <= budget);
            let cost: f64 = items.iter().zip(&got).map(|(i, &k)| i.choices[k].2).sum();
            // The grid is fine enough for these sizes to be exact.
            assert!((cost - brute(&items, budget).unwrap()).abs() < 1e-9, "{cost}");
        }
        assert!(solve(&[item("a", &[(10, 1.0)])], 9).is_none());
    }

    #[test]
    fn test_weighted_error_prefers_more_bits_on_heavy_channels() {
        let w: Vec<f32> = (0..64 * 256).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let e = errors(&w, 256, None, &[GgmlType::Q4_0, GgmlType::Q8_0]);
        assert!(e[0] > 10.0 * e[1] && e[1] > 0.0);
        let mut items = vec![item("a", &[(1, 1.0)]), item("b", &[(1, 3.0)])];
        assert_eq!(raise(&mut items, &[0, 0], 0.5, 4.0), vec!["b".to_string()]);
        assert!((items[1].weight - 4.0).abs() < 1e-12);
    }
}

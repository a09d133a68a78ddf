//! The one-pass MonoScore engine against the O(N²) pairwise reference, and the batch loss.

use candle_core::{DType, Device, Tensor, Var};
use mono::monoscore::{
    dense_batch_mono_loss, pairwise_monoscore, MonoScoreAccumulator, MonoScores, ScorePath,
    SparseBatch,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// Random data with every awkward neuron kind in its first columns:
/// 0 never fires, 1 constant, 2 fires on one image, 3 signed (min < 0), 4 fires on two images,
/// 5 takes its minimum on several images; the rest are ReLU'd Gaussians (about half zeros).
fn awkward_case(n: usize, d: usize, m: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    assert!(m >= 6 && n >= 3);
    let mut rng = StdRng::seed_from_u64(seed);
    let embeddings: Vec<f32> = (0..n * d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let mut acts = vec![0f32; n * m];
    for i in 0..n {
        for k in 0..m {
            let g: f32 = StandardNormal.sample(&mut rng);
            acts[i * m + k] = match k {
                0 => 0.0,
                1 => 3.5,
                2 => (i == n / 2) as u8 as f32 * 2.0,
                3 => g * 2.0 - 0.5,
                4 => (i == 0 || i == n - 1) as u8 as f32 * (1.0 + i as f32),
                5 => {
                    if i % 3 == 0 {
                        -1.25
                    } else {
                        g.abs()
                    }
                }
                _ => g.max(0.0) * rng.random_range(0.5..2.0),
            };
        }
    }
    (embeddings, acts)
}

fn one_pass(
    embeddings: &[f32],
    acts: &[f32],
    d: usize,
    m: usize,
    batch: usize,
    path: ScorePath,
) -> MonoScores {
    let mut acc = MonoScoreAccumulator::new(d, m);
    let n = embeddings.len() / d;
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        acc.add(&embeddings[start * d..end * d], &acts[start * m..end * m], path).unwrap();
        start = end;
    }
    acc.finish()
}

fn assert_close(a: &MonoScores, b: &MonoScores, tol: f64) {
    let diff = a.max_relative_difference(b, 1e-9).unwrap();
    assert!(diff <= tol, "max relative difference {diff:e} > {tol:e}");
}

#[test]
fn one_pass_matches_pairwise_reference_on_several_shapes() {
    for (n, d, m, seed) in [
        (3, 2, 6, 1),
        (17, 5, 9, 2),
        (64, 16, 12, 3),
        (200, 33, 20, 4),
        (97, 1, 7, 5),
        (40, 150, 9, 6),
    ] {
        let (e, a) = awkward_case(n, d, m, seed);
        let reference = pairwise_monoscore(&e, &a, n, d, m).unwrap();
        for path in [ScorePath::Dense, ScorePath::Sparse, ScorePath::Auto] {
            let got = one_pass(&e, &a, d, m, 7, path);
            assert_close(&got, &reference, 1e-6);
        }
        // The awkward columns are classified as documented.
        let s = &reference.scores;
        assert!(s[0].is_none(), "never-firing neuron must be dead");
        assert!(s[1].is_none(), "constant neuron must be dead");
        assert!(s[2].is_none(), "single-image neuron must be dead");
        assert!(s[3].is_some() && s[5].is_some());
        assert!(s[4].is_some(), "a neuron firing on two images is live");
    }
}

#[test]
fn two_images_score_is_their_cosine() {
    let e = [1.0f32, 0.0, 0.6, 0.8];
    let a = [1.0f32, 2.0, 3.0, 4.0]; // neuron 0: [1, 3]; neuron 1: [2, 4]
    let scores = one_pass(&e, &a, 2, 2, 1, ScorePath::Dense);
    // With N = 2 the min image has ã = 0, so no pair carries weight: both neurons are dead.
    assert_eq!(scores.scores, vec![None, None]);
    let reference = pairwise_monoscore(&e, &a, 2, 2, 2).unwrap();
    assert_eq!(reference.scores, vec![None, None]);

    // Three images, two above the minimum: the score is the cosine of those two (0.6).
    let e = [1.0f32, 0.0, 0.6, 0.8, 0.0, 1.0];
    let a = [5.0f32, 5.0, 0.0];
    let scores = one_pass(&e, &a, 2, 1, 2, ScorePath::Sparse);
    assert!((scores.scores[0].unwrap() - 0.6).abs() < 1e-7); // 0.6f32, 0.8f32 are inexact
}

#[test]
fn sparse_equals_dense_and_invariant_to_row_order_and_batch_size() {
    let (n, d, m) = (301, 24, 40);
    let (e, a) = awkward_case(n, d, m, 11);
    let dense = one_pass(&e, &a, d, m, 64, ScorePath::Dense);
    let sparse = one_pass(&e, &a, d, m, 64, ScorePath::Sparse);
    assert_close(&sparse, &dense, 1e-9);
    for batch in [1, 2, 50, 301, 1000] {
        assert_close(&one_pass(&e, &a, d, m, batch, ScorePath::Sparse), &dense, 1e-9);
        assert_close(&one_pass(&e, &a, d, m, batch, ScorePath::Dense), &dense, 1e-9);
    }
    // Reverse-and-rotate the rows.
    let order: Vec<usize> = (0..n).map(|i| (n - 1 - i + 37) % n).collect();
    let e2: Vec<f32> = order.iter().flat_map(|&i| e[i * d..(i + 1) * d].to_vec()).collect();
    let a2: Vec<f32> = order.iter().flat_map(|&i| a[i * m..(i + 1) * m].to_vec()).collect();
    assert_close(&one_pass(&e2, &a2, d, m, 33, ScorePath::Auto), &dense, 1e-9);
}

#[test]
fn sparse_input_with_explicit_negative_values_matches_dense() {
    let (n, d, m) = (50, 6, 8);
    let mut rng = StdRng::seed_from_u64(5);
    let e: Vec<f32> = (0..n * d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let mut a = vec![0f32; n * m];
    for v in a.iter_mut() {
        if rng.random::<f32>() < 0.2 {
            *v = StandardNormal.sample(&mut rng);
        }
    }
    let sparse = SparseBatch::from_dense(&a, m);
    let mut acc = MonoScoreAccumulator::new(d, m);
    acc.add_sparse(&e, sparse.as_rows()).unwrap();
    let reference = pairwise_monoscore(&e, &a, n, d, m).unwrap();
    assert_close(&acc.finish(), &reference, 1e-6);
}

#[test]
fn summary_excludes_dead_neurons() {
    let scores =
        MonoScores { n: 10, d: 3, scores: vec![Some(0.2), None, Some(0.6), Some(0.4), None] };
    let s = scores.summary();
    assert_eq!((s.live, s.dead), (3, 2));
    assert!((s.mean.unwrap() - 0.4).abs() < 1e-12);
    assert!((s.median.unwrap() - 0.4).abs() < 1e-12);
    let even = MonoScores { n: 10, d: 3, scores: vec![Some(0.1), Some(0.3)] };
    assert!((even.summary().median.unwrap() - 0.2).abs() < 1e-12);
    let none = MonoScores { n: 10, d: 3, scores: vec![None] };
    assert_eq!(none.summary().mean, None);
}

#[test]
fn rejects_bad_batches() {
    let mut acc = MonoScoreAccumulator::new(2, 2);
    let err = acc.add(&[0.0, 0.0], &[1.0, 2.0], ScorePath::Auto).unwrap_err();
    assert!(err.to_string().contains("zero norm"), "{err}");
    let err = acc.add(&[1.0, 0.0], &[f32::NAN, 2.0], ScorePath::Auto).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    let err = acc.add(&[1.0, 0.0], &[1.0, 2.0, 3.0], ScorePath::Auto).unwrap_err();
    assert!(err.to_string().contains("expected 1 rows"), "{err}");
    let bad = SparseBatch { row_offsets: vec![0, 1], columns: vec![7], values: vec![1.0] };
    let err = acc.add_sparse(&[1.0, 0.0], bad.as_rows()).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    assert_eq!(acc.n_rows(), 0, "rejected batches must not be half-added");
}

/// The batch loss on (B, M) f64 activations; returns (loss, per-neuron batch scores).
fn loss_of(sim: &Tensor, acts: &Tensor) -> f64 {
    dense_batch_mono_loss(acts, sim, 1e-8).unwrap().loss.to_scalar::<f64>().unwrap()
}

#[test]
fn batch_loss_is_one_minus_mean_batch_monoscore() {
    let (b, d, m) = (40, 8, 12);
    let (e, a) = awkward_case(b, d, m, 21);
    let dev = Device::Cpu;
    let sim = Tensor::from_vec(e.clone(), (b, d), &dev).unwrap();
    let acts = Tensor::from_vec(a.clone(), (b, m), &dev).unwrap().to_dtype(DType::F64).unwrap();
    let out = dense_batch_mono_loss(&acts, &sim, 1e-8).unwrap();
    let reference = pairwise_monoscore(&e, &a, b, d, m).unwrap();
    let s = reference.summary();
    assert_eq!(
        out.n_active.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
        s.live as f64
    );
    let loss = out.loss.to_scalar::<f64>().unwrap();
    assert!(
        (loss - (1.0 - s.mean.unwrap())).abs() < 1e-6,
        "loss {loss} vs 1 − {}",
        s.mean.unwrap()
    );
    let per_neuron = out.scores.to_vec1::<f64>().unwrap();
    for (k, r) in reference.scores.iter().enumerate() {
        match r {
            Some(r) => assert!((per_neuron[k] - r).abs() < 1e-6 * r.abs().max(1e-3), "neuron {k}"),
            None => assert_eq!(per_neuron[k], 0.0, "dead neuron {k} must not enter the loss"),
        }
    }
}

#[test]
fn batch_loss_gradient_matches_central_differences() {
    // Continuous values: no ties at the min or max, so the loss is differentiable everywhere here,
    // and the min/max entries' own gradients (through the scaling) are checked too.
    let (b, d, m) = (9, 4, 5);
    let mut rng = StdRng::seed_from_u64(3);
    let dev = Device::Cpu;
    let e: Vec<f64> = (0..b * d).map(|_| StandardNormal.sample(&mut rng)).collect();
    let a: Vec<f64> = (0..b * m).map(|_| rng.random_range(-1.0..2.0)).collect();
    let sim = Tensor::from_vec(e, (b, d), &dev).unwrap();
    let acts = Var::from_tensor(&Tensor::from_vec(a.clone(), (b, m), &dev).unwrap()).unwrap();
    let out = dense_batch_mono_loss(acts.as_tensor(), &sim, 1e-8).unwrap();
    let grads = out.loss.backward().unwrap();
    let grad = grads.get(acts.as_tensor()).expect("gradient reaches the activations");
    let grad = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();

    let h = 1e-6;
    let mut max_err = 0.0f64;
    let mut nonzero = 0;
    for idx in 0..b * m {
        let mut plus = a.clone();
        plus[idx] += h;
        let mut minus = a.clone();
        minus[idx] -= h;
        let lp = loss_of(&sim, &Tensor::from_vec(plus, (b, m), &dev).unwrap());
        let lm = loss_of(&sim, &Tensor::from_vec(minus, (b, m), &dev).unwrap());
        let fd = (lp - lm) / (2.0 * h);
        max_err = max_err.max((fd - grad[idx]).abs() / fd.abs().max(1e-4));
        nonzero += (grad[idx].abs() > 1e-9) as usize;
    }
    assert!(max_err < 1e-4, "autograd vs finite differences: max relative error {max_err:e}");
    assert_eq!(nonzero, b * m, "every activation, min and max included, gets a gradient");
}

#[test]
fn batch_loss_is_finite_when_no_neuron_is_active() {
    let dev = Device::Cpu;
    let sim = Tensor::ones((4, 3), DType::F32, &dev).unwrap();
    let acts = Var::from_tensor(&Tensor::zeros((4, 6), DType::F32, &dev).unwrap()).unwrap();
    let out = dense_batch_mono_loss(acts.as_tensor(), &sim, 1e-8).unwrap();
    assert_eq!(out.n_active.to_scalar::<f32>().unwrap(), 0.0);
    assert_eq!(out.loss.to_scalar::<f32>().unwrap(), 1.0);
    let grads = out.loss.backward().unwrap();
    if let Some(g) = grads.get(acts.as_tensor()) {
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
    }
}

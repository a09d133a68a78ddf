//! SAE architectures and their sparse ops against plain references on tiny sizes.

use candle_core::{DType, Device, Tensor, Var};
use mono::base::host::Kernels;
use mono::base::sparse::SparseBatch;
use mono::config::{SaeConfig, SaeKind};
use mono::models::topk;
use mono::sae::{self, ops, Sae, SaeSpec};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn randn(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

fn var(data: Vec<f32>, shape: impl Into<candle_core::Shape>) -> Var {
    Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
}

const HOST: Kernels = Kernels::Host;

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y} (scale {scale})");
    }
}

/// The sparse custom ops (encoder with its input centring, TopK, decoder, MonoLoss) give the
/// dense graph's loss and parameter gradients, and the input's gradient when it needs one.
#[test]
fn sparse_ops_match_the_dense_graph() {
    let (b, d, m, k) = (24, 6, 40, 3);
    let mut rng = StdRng::seed_from_u64(7);
    // A variable input: the encoder's input gradient is checked too (data inputs skip it).
    let x_var = var(randn(b * d, &mut rng), (b, d));
    let x = x_var.as_tensor().clone();
    let sim = Tensor::from_vec(randn(b * 5, &mut rng), (b, 5), &Device::Cpu).unwrap();
    let w_enc = var(randn(m * d, &mut rng), (m, d));
    let w_dec = var(randn(m * d, &mut rng), (m, d));
    let b_enc = var(randn(m, &mut rng), m);
    let b_dec = var(randn(d, &mut rng), d);
    let lambda = 0.7;

    for selection in [topk::Selection::PerRow(k), topk::Selection::Batch(k * b)] {
        // Sparse path.
        let (we, be, bd) = (w_enc.as_tensor(), b_enc.as_tensor(), b_dec.as_tensor());
        let pre =
            ops::encoder_linear(&x, we, be, Some(bd), HOST).unwrap().pre.tensor().unwrap().clone();
        let lat = topk::topk_latents(&pre, &selection, None, HOST)
            .unwrap()
            .latents
            .tensor()
            .unwrap()
            .clone();
        assert!(
            flat(&lat).iter().filter(|v| **v != 0.0).count() as f64 / (b * m) as f64 <= 0.1,
            "test must exercise the sparse path"
        );
        // Without the selection's CSR: the decoder counts the latents itself.
        let dense: topk::Latents = lat.clone().into();
        let recon = ops::support_matmul(&dense, None, None, w_dec.as_tensor(), None, HOST).unwrap();
        let mono = mono::monoscore::batch_mono_loss(&lat, &sim, 1e-8, None, HOST).unwrap();
        let n_active = scalar(&mono.n_active);
        let loss = ((recon - &x).unwrap().sqr().unwrap().mean_all().unwrap()
            + (mono.loss * lambda).unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();

        // Dense reference: the same selection as a constant mask, plain candle ops.
        let pre_d = x
            .broadcast_sub(bd)
            .unwrap()
            .matmul(&w_enc.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b_enc.as_tensor())
            .unwrap();
        let (mask, _) = topk::select_mask(&flat(&pre_d), m, &selection, None, true);
        let mask = Tensor::from_vec(
            mask.iter().map(|&v| v as u8 as f32).collect::<Vec<_>>(),
            (b, m),
            &Device::Cpu,
        )
        .unwrap();
        let lat_d = (pre_d.relu().unwrap() * mask).unwrap();
        let recon_d = lat_d.matmul(w_dec.as_tensor()).unwrap();
        let mono_d = mono::monoscore::dense_batch_mono_loss(&lat_d, &sim, 1e-8).unwrap();
        assert_eq!(scalar(&mono_d.n_active), n_active);
        let loss_d = ((recon_d - &x).unwrap().sqr().unwrap().mean_all().unwrap()
            + (&mono_d.loss * lambda).unwrap())
        .unwrap();
        let grads_d = loss_d.backward().unwrap();

        assert_close(&flat(&lat), &flat(&lat_d), 1e-6, "latents");
        assert!(
            (loss.to_scalar::<f32>().unwrap() - loss_d.to_scalar::<f32>().unwrap()).abs() < 1e-5
        );
        let checked = [("W_enc", &w_enc), ("W_dec", &w_dec), ("b_enc", &b_enc), ("b_dec", &b_dec)];
        for (name, v) in checked.iter().copied().chain([("x", &x_var)]) {
            let g = flat(grads.get(v.as_tensor()).unwrap());
            let gd = flat(grads_d.get(v.as_tensor()).unwrap());
            assert_close(&g, &gd, 1e-4, name);
        }

        // The fused decoder + MonoLoss (gradient added inside the decoder's backward), on a
        // data input (no input gradient), differentiated through the latents or, as the SAEs
        // run, straight into the pre-activations they were selected from.
        let x = x.detach();
        for into_pre in [false, true] {
            let ops::Encoded { pre, port } =
                ops::encoder_linear(&x, we, be, Some(bd), HOST).unwrap();
            // With the CSR the selection built on the way, as the SAEs run.
            let selected =
                topk::topk_latents(pre.tensor().unwrap(), &selection, None, HOST).unwrap();
            let csr = selected.csr.expect("host selection builds the CSR");
            assert_eq!(csr, SparseBatch::from_dense(&flat(selected.latents.tensor().unwrap()), m));
            // Into pre: the latents are detached, so W_enc and the biases get their gradients
            // only if the decoder really differentiates into `pre`.
            let lat: topk::Latents = match into_pre {
                true => selected.latents.tensor().unwrap().detach().into(),
                false => selected.latents,
            };
            let term = ops::MonoTerm { similarity: &sim, lambda, eps: 1e-8 };
            let of_pre = into_pre.then(|| port.as_ref().expect("trainable encoder: a port"));
            let decoded =
                ops::decode(&lat, Some(csr), of_pre, w_dec.as_tensor(), None, Some(term), HOST)
                    .unwrap();
            assert!(
                decoded.latents_csr.is_none(),
                "training latents keep their CSR for the backward"
            );
            let mono_f = decoded.mono.unwrap();
            assert_eq!(scalar(&mono_f.n_active), n_active);
            let loss_f = ((decoded.output - &x).unwrap().sqr().unwrap().mean_all().unwrap()
                + (mono_f.loss * lambda).unwrap())
            .unwrap();
            assert!(
                (loss_f.to_scalar::<f32>().unwrap() - loss_d.to_scalar::<f32>().unwrap()).abs()
                    < 1e-5
            );
            let grads_f = loss_f.backward().unwrap();
            for (name, v) in checked {
                let g = flat(grads_f.get(v.as_tensor()).unwrap());
                let gd = flat(grads_d.get(v.as_tensor()).unwrap());
                assert_close(&g, &gd, 1e-4, &format!("fused {name}, into pre: {into_pre}"));
            }
        }
    }
}

/// Parameter gradients of a reconstruction loss through a decoder of host-selected latents,
/// the decoder given their `pre` (`into_pre`) or not; `detach`: the latents handed to the decoder
/// carry no graph, so W_enc's gradient can only come through `pre`.
fn decoder_route_grads(k: usize, into_pre: bool, detach: bool) -> Vec<Vec<f32>> {
    let (b, d, m) = (16, 5, 40);
    let mut rng = StdRng::seed_from_u64(11);
    let x = Tensor::from_vec(randn(b * d, &mut rng), (b, d), &Device::Cpu).unwrap();
    let w_enc = var(randn(m * d, &mut rng), (m, d));
    let w_dec = var(randn(m * d, &mut rng), (m, d));
    let b_enc = var(randn(m, &mut rng), m);
    let ops::Encoded { pre, port } =
        ops::encoder_linear(&x, w_enc.as_tensor(), b_enc.as_tensor(), None, HOST).unwrap();
    let selected =
        topk::topk_latents(pre.tensor().unwrap(), &topk::Selection::PerRow(k), None, HOST).unwrap();
    let latents: topk::Latents = match detach {
        true => selected.latents.tensor().unwrap().detach().into(),
        false => selected.latents,
    };
    let of_pre = into_pre.then(|| port.as_ref().unwrap());
    let recon =
        ops::support_matmul(&latents, selected.csr, of_pre, w_dec.as_tensor(), None, HOST).unwrap();
    let grads = (recon - &x).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    [&w_enc, &w_dec, &b_enc].iter().map(|v| flat(grads.get(v.as_tensor()).unwrap())).collect()
}

/// Differentiating straight into `pre` is the masked ReLU's chain rule exactly (the same float
/// operations), on sparse latents; on latents too dense for the sparse decoder the decoder
/// ignores `pre` and takes the dense route through the latents, with the same gradients.
#[test]
fn the_decoder_into_pre_gives_the_same_gradients_as_through_the_latents() {
    let through_latents = decoder_route_grads(2, false, false);
    assert_eq!(decoder_route_grads(2, true, true), through_latents, "sparse");
    let through_latents = decoder_route_grads(20, false, false);
    assert_eq!(decoder_route_grads(20, true, false), through_latents, "too dense");
}

/// The port and `pre`'s own node together: a loss with a decoder through the port and a term
/// through the latents (as the full-dataset MonoLoss's surrogate is) gets the gradients of the
/// same loss taken entirely through the latents; two decoders on the same port (the SAE's and
/// AuxK's) are summed. A second backward pass fails instead of returning the encoder's gradient
/// without the port's part.
#[test]
fn the_pre_port_adds_up_with_gradients_through_the_latents() {
    let (b, d, m, k) = (12, 6, 48, 3);
    let mut rng = StdRng::seed_from_u64(5);
    let x = Tensor::from_vec(randn(b * d, &mut rng), (b, d), &Device::Cpu).unwrap();
    let w_enc = var(randn(m * d, &mut rng), (m, d));
    let w_dec = var(randn(m * d, &mut rng), (m, d));
    let b_enc = var(randn(m, &mut rng), m);
    let b_dec = var(randn(d, &mut rng), d);
    let weights = Tensor::from_vec(randn(b * m, &mut rng), (b, m), &Device::Cpu).unwrap();
    let grads = |use_port: bool| {
        let (we, be, bd) = (w_enc.as_tensor(), b_enc.as_tensor(), b_dec.as_tensor());
        let ops::Encoded { pre, port } = ops::encoder_linear(&x, we, be, Some(bd), HOST).unwrap();
        let port = port.filter(|_| use_port);
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for (k, shift) in [(k, 0.0), (2 * k, 0.5)] {
            let selected =
                topk::topk_latents(pre.tensor().unwrap(), &topk::Selection::PerRow(k), None, HOST)
                    .unwrap();
            let latents = selected.latents;
            let recon = ops::support_matmul(
                &latents,
                selected.csr,
                port.as_ref(),
                w_dec.as_tensor(),
                None,
                HOST,
            )
            .unwrap();
            let term = (recon - (&x + shift).unwrap()).unwrap().sqr().unwrap().sum_all().unwrap();
            let through_latents =
                (latents.tensor().unwrap() * &weights).unwrap().sum_all().unwrap();
            loss = (loss + term + through_latents).unwrap();
        }
        let g = loss.backward().unwrap();
        if use_port {
            let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loss.backward()));
            assert!(matches!(again, Ok(Err(_))), "a second backward pass must fail");
        }
        [&w_enc, &w_dec, &b_enc, &b_dec].map(|v| flat(g.get(v.as_tensor()).unwrap()))
    };
    let (through_port, through_latents) = (grads(true), grads(false));
    for (name, (a, b)) in
        ["W_enc", "W_dec", "b_enc", "b_dec"].iter().zip(through_port.iter().zip(&through_latents))
    {
        assert_close(a, b, 1e-5, name);
    }
}

#[test]
fn topk_keeps_k_per_row_and_batch_topk_keeps_k_times_b() {
    let (b, m, k) = (32, 50, 4);
    let mut rng = StdRng::seed_from_u64(3);
    let values = randn(b * m, &mut rng);
    let (mask, _) = topk::select_mask(&values, m, &topk::Selection::PerRow(k), None, false);
    for (r, row) in mask.chunks(m).enumerate() {
        assert_eq!(row.iter().filter(|x| **x).count(), k);
        // They are the k largest of the row.
        let kept_min = values[r * m..(r + 1) * m]
            .iter()
            .zip(row)
            .filter(|(_, k)| **k)
            .map(|(v, _)| *v)
            .fold(f32::INFINITY, f32::min);
        let dropped_max = values[r * m..(r + 1) * m]
            .iter()
            .zip(row)
            .filter(|(_, k)| !**k)
            .map(|(v, _)| *v)
            .fold(f32::NEG_INFINITY, f32::max);
        assert!(kept_min >= dropped_max);
    }
    let (mask, min) = topk::select_mask(&values, m, &topk::Selection::Batch(k * b), None, true);
    assert_eq!(mask.iter().filter(|x| **x).count(), k * b);
    let mut sorted: Vec<f32> = values.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(min, Some(sorted[k * b - 1]));
    // Ties: exactly n kept, lowest positions first.
    let ties = vec![1.0f32; 20];
    let (mask, _) = topk::select_mask(&ties, 10, &topk::Selection::Batch(7), None, true);
    assert_eq!(mask.iter().filter(|x| **x).count(), 7);
    assert!(mask[..7].iter().all(|x| *x));
    // Allowed columns only.
    let allowed: Vec<bool> = (0..m).map(|c| c % 5 == 0).collect();
    let (mask, _) =
        topk::select_mask(&values, m, &topk::Selection::PerRow(3), Some(&allowed), false);
    assert!(mask.iter().enumerate().all(|(i, &k)| !k || allowed[i % m]));
}

fn spec(kind: SaeKind, d: usize, m: usize, k: usize) -> SaeSpec {
    let mut s = SaeSpec::from_config(&SaeConfig::of_kind(kind), d);
    (s.n_latents, s.k, s.normalize_input) = (m, k, false);
    s
}

/// Plain-Rust forward of an SAE: latents and reconstruction, from the parameters' values.
fn reference_forward(s: &dyn Sae, x: &[f32], b: usize) -> (Vec<f32>, Vec<f32>) {
    let spec = s.spec().clone();
    let (d, m) = (spec.d_in, spec.n_latents);
    let p = s.params();
    let (we, wd, be, bd) = (
        flat(p.w_enc.as_tensor()),
        flat(p.w_dec.as_tensor()),
        flat(p.b_enc.as_tensor()),
        flat(p.b_dec.as_tensor()),
    );
    let mut pre = vec![0f32; b * m];
    for i in 0..b {
        for j in 0..m {
            let mut acc = be[j];
            for t in 0..d {
                let xi = x[i * d + t] - if s.spec().centers_input() { bd[t] } else { 0.0 };
                acc += xi * we[j * d + t];
            }
            pre[i * m + j] = acc;
        }
    }
    let mut lat = vec![0f32; b * m];
    match spec.kind {
        SaeKind::Topk => {
            for i in 0..b {
                let mut idx: Vec<usize> = (0..m).collect();
                idx.sort_by(|&a, &c| pre[i * m + c].total_cmp(&pre[i * m + a]));
                for &j in &idx[..spec.k] {
                    lat[i * m + j] = pre[i * m + j].max(0.0);
                }
            }
        }
        SaeKind::BatchTopk => {
            let mut idx: Vec<usize> = (0..b * m).collect();
            idx.sort_by(|&a, &c| pre[c].total_cmp(&pre[a]));
            for &j in &idx[..spec.k * b] {
                lat[j] = pre[j].max(0.0);
            }
        }
        SaeKind::Relu => lat.iter_mut().zip(&pre).for_each(|(l, p)| *l = p.max(0.0)),
        SaeKind::Jumprelu => {
            let theta: Vec<f32> = flat(p.log_threshold.as_ref().unwrap().as_tensor())
                .iter()
                .map(|v| v.exp())
                .collect();
            for i in 0..b * m {
                let z = pre[i].max(0.0);
                lat[i] = if z > theta[i % m] { z } else { 0.0 };
            }
        }
    }
    let mut recon = vec![0f32; b * d];
    for i in 0..b {
        for t in 0..d {
            recon[i * d + t] = bd[t] + (0..m).map(|j| lat[i * m + j] * wd[j * d + t]).sum::<f32>();
        }
    }
    (lat, recon)
}

#[test]
fn every_architecture_matches_a_plain_forward_and_its_gradients_match_finite_differences() {
    let (b, d, m, k) = (12, 5, 30, 2);
    let mut rng = StdRng::seed_from_u64(11);
    let x_data = randn(b * d, &mut rng);
    let x = Tensor::from_vec(x_data.clone(), (b, d), &Device::Cpu).unwrap();
    let kinds = [SaeKind::Topk, SaeKind::BatchTopk, SaeKind::Relu, SaeKind::Jumprelu];
    for (kind, kernels) in kinds.into_iter().flat_map(|k| [(k, HOST), (k, Kernels::Portable)]) {
        let mut s = spec(kind, d, m, k);
        s.jumprelu_init_log_threshold = -1.0;
        let model = sae::build(&s, 5, &Device::Cpu, kernels).unwrap();
        let pass = sae::forward(model.as_ref(), &x, true).unwrap();
        let (lat, recon) = reference_forward(model.as_ref(), &x_data, b);
        assert_close(&flat(pass.latents().unwrap()), &lat, 1e-5, &format!("{kind:?} latents"));
        assert_close(&flat(&pass.recon), &recon, 1e-5, &format!("{kind:?} recon"));

        // Reconstruction-loss gradient w.r.t. W_dec and b_dec: finite differences of the plain
        // forward (the selection is locally constant).
        let loss = model.reconstruction_loss(&pass).unwrap();
        let grads = loss.backward().unwrap();
        let plain_loss = |m_: &dyn Sae| -> f64 {
            let (_, r) = reference_forward(m_, &x_data, b);
            let err: f64 =
                r.iter().zip(&x_data).map(|(a, c)| ((a - c) as f64).powi(2)).sum::<f64>();
            if kind == SaeKind::Topk {
                // normalised MSE: per-row error over per-row ‖x‖²
                (0..b)
                    .map(|i| {
                        let e: f64 = (0..d)
                            .map(|t| ((r[i * d + t] - x_data[i * d + t]) as f64).powi(2))
                            .sum();
                        let n: f64 = (0..d).map(|t| (x_data[i * d + t] as f64).powi(2)).sum();
                        e / n
                    })
                    .sum::<f64>()
                    / b as f64
            } else {
                err / (b * d) as f64
            }
        };
        for (name, v) in [("W_dec", &model.params().w_dec), ("b_dec", &model.params().b_dec)] {
            let g = flat(grads.get(v.as_tensor()).unwrap());
            let base = flat(v.as_tensor());
            for idx in (0..base.len()).step_by(7) {
                let h = 1e-3f32;
                let shifted = |delta: f32| {
                    let mut data = base.clone();
                    data[idx] += delta;
                    v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap()).unwrap();
                    let l = plain_loss(model.as_ref());
                    v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    l
                };
                let fd = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
                assert!(
                    (fd - g[idx] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{kind:?} {name}[{idx}]: fd {fd} vs {}",
                    g[idx]
                );
            }
        }
    }
}

#[test]
fn jumprelu_threshold_gradient_is_the_pseudo_derivative() {
    let (b, d, m) = (40, 4, 64);
    let mut rng = StdRng::seed_from_u64(2);
    let x_data = randn(b * d, &mut rng);
    let x = Tensor::from_vec(x_data, (b, d), &Device::Cpu).unwrap();
    let mut s = spec(SaeKind::Jumprelu, d, m, 4);
    s.jumprelu_bandwidth = 0.6; // wide band: entries on both sides of θ
    s.jumprelu_init_log_threshold = (0.5f64).ln();
    for kernels in [HOST, Kernels::Portable] {
        let model = sae::build(&s, 9, &Device::Cpu, kernels).unwrap();
        let pass = sae::forward(model.as_ref(), &x, true).unwrap();
        let density = flat(pass.latents().unwrap()).iter().filter(|v| **v != 0.0).count() as f64
            / (b * m) as f64;
        assert!(
            density > 0.0 && density <= 0.1,
            "density {density}: the test must take the sparse decoder path"
        );
        let no_dead = Tensor::zeros(m, DType::U8, &Device::Cpu).unwrap();
        let extra = model.extra_losses(&pass, &no_dead).unwrap();
        let (_, l0_term) = extra.iter().find(|(n, _)| *n == "l0").unwrap();
        let recon_loss = model.reconstruction_loss(&pass).unwrap();
        let total = (&recon_loss + l0_term).unwrap();
        let grads = total.backward().unwrap();
        let got =
            flat(grads.get(model.params().log_threshold.as_ref().unwrap().as_tensor()).unwrap());

        // Expected, as the reference applies the pseudo-derivatives to log θ directly (no chain
        // factor θ): Σ_i [ −(θ_k/ε) K_ik · ∂L/∂out_ik − l0_coef/(B ε) K_ik ], with
        // ∂L/∂out_ik = (2/(B·D)) (recon − x)_i · W_dec[k] — also for outputs that are 0.
        let z: Vec<f32> = flat(&pass.pre.tensor().unwrap().relu().unwrap());
        let resid: Vec<f32> = flat(&(&pass.recon - &pass.input).unwrap());
        let wd = flat(model.params().w_dec.as_tensor());
        let theta: Vec<f32> = flat(model.params().log_threshold.as_ref().unwrap().as_tensor())
            .iter()
            .map(|v| v.exp())
            .collect();
        let eps = s.jumprelu_bandwidth as f32;
        let mut band_below = 0;
        for kk in 0..m {
            let mut g = 0f32;
            for i in 0..b {
                let u = (z[i * m + kk] - theta[kk]) / eps;
                if u.abs() < 0.5 {
                    band_below += (u <= 0.0) as usize;
                    let dout: f32 = (0..d)
                        .map(|t| 2.0 / (b * d) as f32 * resid[i * d + t] * wd[kk * d + t])
                        .sum();
                    g += -(theta[kk] / eps) * dout - s.l0_coef as f32 / (b as f32 * eps);
                }
            }
            let expect = g;
            assert!(
                (got[kk] - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
                "latent {kk}: {} vs {expect}",
                got[kk]
            );
        }
        assert!(band_below > 0, "the test needs entries just below the threshold");
    }
}

/// An inference pass hands out the latents' CSR (what evaluation reads) exactly when the host
/// kernels built one, holding exactly the non-zeros; a training pass of a host selection holds
/// a copy of its activation's (what the dead-latent counters read), also exactly the non-zeros,
/// and decodes without building the dense latents (built when asked for, they agree).
#[test]
fn inference_passes_hand_out_the_latents_nonzeros() {
    let (b, d, m, k) = (16, 6, 80, 3);
    let mut rng = StdRng::seed_from_u64(5);
    let x = Tensor::from_vec(randn(b * d, &mut rng), (b, d), &Device::Cpu).unwrap();
    for kind in [SaeKind::Topk, SaeKind::BatchTopk, SaeKind::Jumprelu, SaeKind::Relu] {
        for kernels in [HOST, Kernels::Portable] {
            let mut model = sae::build(&spec(kind, d, m, k), 1, &Device::Cpu, kernels).unwrap();
            let pass = sae::forward(model.as_ref(), &x, true).unwrap();
            let selection = matches!(kind, SaeKind::Topk | SaeKind::BatchTopk) && kernels == HOST;
            match &pass.latents_csr {
                Some(csr) => {
                    assert!(selection, "{kind:?}: a training CSR without a host selection");
                    assert!(pass.activation.latents.built().is_none(), "{kind:?}: built");
                    assert_eq!(
                        csr,
                        &SparseBatch::from_dense(&flat(pass.latents().unwrap()), m),
                        "{kind:?}"
                    );
                }
                None => {
                    assert!(!selection, "{kind:?}: a host selection's training pass has its CSR")
                }
            }
            model.observe_step(&pass).unwrap();
            let pass = sae::forward(model.as_ref(), &x, false).unwrap();
            let dense = flat(pass.latents().unwrap());
            let sparse_kind = matches!(kind, SaeKind::Topk | SaeKind::BatchTopk);
            match pass.latents_csr {
                Some(csr) => assert_eq!(csr, SparseBatch::from_dense(&dense, m), "{kind:?}"),
                None => assert!(
                    !(kernels == HOST && sparse_kind),
                    "{kind:?}: host TopK inference hands out its CSR"
                ),
            }
        }
    }
}

#[test]
fn batch_topk_inference_does_not_depend_on_the_batch() {
    let (b, d, m, k) = (16, 6, 40, 3);
    let mut rng = StdRng::seed_from_u64(4);
    let x = Tensor::from_vec(randn(b * d, &mut rng), (b, d), &Device::Cpu).unwrap();
    for kernels in [HOST, Kernels::Portable] {
        let mut model =
            sae::build(&spec(SaeKind::BatchTopk, d, m, k), 1, &Device::Cpu, kernels).unwrap();
        let pass = sae::forward(model.as_ref(), &x, true).unwrap();
        assert_eq!(
            flat(pass.latents().unwrap()).iter().filter(|v| **v != 0.0).count(),
            k * b,
            "training keeps k·B"
        );
        model.observe_step(&pass).unwrap();
        let threshold = flat(&model.threshold().unwrap().expect("a threshold after one step"));
        assert!(threshold.iter().all(|t| *t == threshold[0] && *t > 0.0));
        let all = flat(&sae::encode(model.as_ref(), &x).unwrap());
        for r in [0, 5, 15] {
            let one = flat(&sae::encode(model.as_ref(), &x.narrow(0, r, 1).unwrap()).unwrap());
            assert_eq!(one, all[r * m..(r + 1) * m].to_vec(), "row {r} alone vs in the batch");
        }
    }
}

/// `sae::infer` — the path evaluation takes — gives the inference forward pass's latents and
/// reconstruction bit for bit: thresholded kinds through the blocked encoder (several column
/// blocks on two threads, one block on one), TopK through the forward pass itself; with and
/// without standardised inputs, with non-zero biases (the input centred by b_dec).
/// A BatchTopK training pass selects through the AMX screen where the CPU has one, without
/// building the pre-activations, and keeps what the dense selection keeps of them, bit for bit
/// (entries, values, the smallest kept value); the biases are non-zero and the input centred.
#[test]
fn a_screened_batchtopk_pass_keeps_what_the_dense_selection_keeps() {
    let (b, d, m, k) = (256, 48, 384, 8);
    let sae = sae::build(&spec(SaeKind::BatchTopk, d, m, k), 5, &Device::Cpu, HOST).unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    let p = sae.params();
    p.b_enc.set(&Tensor::from_vec(randn(m, &mut rng), m, &Device::Cpu).unwrap()).unwrap();
    p.b_dec.set(&Tensor::from_vec(randn(d, &mut rng), d, &Device::Cpu).unwrap()).unwrap();
    let x = Tensor::from_vec(randn(b * d, &mut rng), (b, d), &Device::Cpu).unwrap();
    let pass = sae::forward(sae.as_ref(), &x, true).unwrap();
    assert_eq!(!pass.pre.is_built(), mono::base::amx::available(), "screened where AMX is");
    let pre = flat(pass.pre.tensor().unwrap());
    let (kept, min) = topk::select_entries(&pre, m, &topk::Selection::Batch(k * b), None, true);
    let got: Vec<(u32, u32)> = pass
        .latents_csr
        .as_ref()
        .unwrap()
        .flat_entries(m)
        .into_iter()
        .map(|(v, i)| (i, v.to_bits()))
        .collect();
    let want: Vec<(u32, u32)> = kept.iter().map(|&i| (i, pre[i as usize].to_bits())).collect();
    assert_eq!(got, want);
    let threshold = pass.activation.batch_threshold.as_ref().unwrap();
    assert_eq!(threshold.to_scalar::<f32>().unwrap().to_bits(), min.unwrap().to_bits());
}

/// Host pre-activations are built when first read; once sealed (the trainer seals them before
/// its optimiser step) building them is an error, while a built tensor stays readable.
#[test]
fn pre_activations_are_refused_after_the_seal_unless_built() {
    let (b, d, m) = (4, 3, 5);
    let mut rng = StdRng::seed_from_u64(3);
    let x = Tensor::from_vec(randn(b * d, &mut rng), (b, d), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(randn(m * d, &mut rng), (m, d), &Device::Cpu).unwrap();
    let b_enc = Tensor::from_vec(randn(m, &mut rng), m, &Device::Cpu).unwrap();
    let unread = ops::encoder_linear(&x, &w, &b_enc, None, HOST).unwrap().pre;
    unread.seal();
    let err = unread.tensor().unwrap_err().to_string();
    assert!(err.contains("after the step"), "{err}");
    let read = ops::encoder_linear(&x, &w, &b_enc, None, HOST).unwrap().pre;
    let before = flat(read.tensor().unwrap());
    read.seal();
    assert_eq!(flat(read.tensor().unwrap()), before);
    assert_eq!(read.dims(), (b, m));
}

#[test]
fn infer_gives_the_forward_pass_values_bit_for_bit() {
    let (b, d, m, k) = (64, 48, 1536, 8);
    let mut rng = StdRng::seed_from_u64(11);
    let x = Tensor::from_vec(randn(b * d, &mut rng), (b, d), &Device::Cpu).unwrap();
    for kind in [SaeKind::BatchTopk, SaeKind::Jumprelu, SaeKind::Relu, SaeKind::Topk] {
        for normalize_input in [false, true] {
            let mut s = spec(kind, d, m, k);
            s.normalize_input = normalize_input;
            let mut model = sae::build(&s, 3, &Device::Cpu, HOST).unwrap();
            let p = model.params();
            p.b_enc.set(&Tensor::from_vec(randn(m, &mut rng), m, &Device::Cpu).unwrap()).unwrap();
            p.b_dec.set(&Tensor::from_vec(randn(d, &mut rng), d, &Device::Cpu).unwrap()).unwrap();
            if let Some(log_theta) = &p.log_threshold {
                // Thresholds around the pre-activations' scale: some pass, most do not.
                let t: Vec<f32> = randn(m, &mut rng).iter().map(|v| 0.3 * v + 0.5).collect();
                log_theta.set(&Tensor::from_vec(t, m, &Device::Cpu).unwrap()).unwrap();
            }
            let pass = sae::forward(model.as_ref(), &x, true).unwrap();
            model.observe_step(&pass).unwrap();
            let reference = sae::forward(model.as_ref(), &x, false).unwrap();
            let dense = flat(reference.latents().unwrap());
            let nnz = dense.iter().filter(|v| **v != 0.0).count();
            assert!(nnz > 0 && nnz < b * m, "{kind:?}: a mix of kept and dropped latents");
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                // An SAE is Send, not Sync: it goes to the pool and back.
                let input = x.clone();
                let (back, got) = pool.install(move || {
                    let got = sae::infer(model.as_ref(), &input);
                    (model, got)
                });
                model = back;
                let got = got.unwrap();
                let what =
                    format!("{kind:?}, normalize_input {normalize_input}, {threads} threads");
                assert_eq!(got.latents, SparseBatch::from_dense(&dense, m), "{what}: latents");
                let (want, got) = (flat(&reference.recon), flat(&got.recon));
                let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{what}: reconstruction");
            }
        }
    }
}

/// The blocked thresholding keeps pre > t and pre > 0 — strictly, so an entry equal to its
/// threshold is dropped, and never under a NaN threshold — as the masked ReLU of the encoder's
/// output does.
#[test]
fn encode_above_keeps_the_entries_strictly_above_their_thresholds() {
    let (b, d, m) = (32, 16, 1152);
    let mut rng = StdRng::seed_from_u64(12);
    let x = Tensor::from_vec(randn(b * d, &mut rng), (b, d), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(randn(m * d, &mut rng), (m, d), &Device::Cpu).unwrap();
    let b_enc = Tensor::from_vec(randn(m, &mut rng), m, &Device::Cpu).unwrap();
    let pre = flat(ops::encoder_linear(&x, &w, &b_enc, None, HOST).unwrap().pre.tensor().unwrap());
    // Per latent: its value in row 3 (an exact tie there), NaN, or a negative threshold.
    let thresholds: Vec<f32> = (0..m)
        .map(|j| match j % 3 {
            0 => pre[3 * m + j],
            1 if j % 7 == 0 => f32::NAN,
            _ => -0.5,
        })
        .collect();
    let want: Vec<f32> = pre
        .iter()
        .enumerate()
        .map(|(i, &v)| if v > thresholds[i % m] && v > 0.0 { v } else { 0.0 })
        .collect();
    let keep = ops::KeepAbove::PerLatent(thresholds.clone());
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let got = pool.install(|| ops::encode_above(&x, &w, &b_enc, None, &keep, None)).unwrap();
        assert_eq!(got, SparseBatch::from_dense(&want, m), "{threads} threads");
    }
    let t = 0.25;
    let want: Vec<f32> = pre.iter().map(|&v| if v > t { v } else { 0.0 }).collect();
    let got = ops::encode_above(&x, &w, &b_enc, None, &ops::KeepAbove::All(t), None).unwrap();
    assert_eq!(got, SparseBatch::from_dense(&want, m), "one threshold for all");
}

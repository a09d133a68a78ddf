//! Parameter gradients that host ops hand straight to the trainer, past candle's `GradStore`.
//!
//! candle's backward pass adds each input's gradient into a buffer it first zero-fills, and the
//! trainer then copies the sum out of the store: for an SAE's two (M × D) matrices that is a
//! 25 MiB zero-fill, an addition and a copy each, every step. A host op whose weight is a
//! variable can instead leave its gradient here and report none to candle; the trainer adds
//! what it finds here to what the store holds.
//!
//! Only a caller that reads the sink back after the backward pass may hand one to the ops —
//! a gradient left here is lost to the parameter — so the trainer creates one per step and
//! checks that it took everything (`GradSink::finish`). Ops take the sink made active for the
//! forward pass on this thread (`GradSink::during`) when they are built, so no layer between
//! the trainer and them passes it on.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Result};
use candle_core::{Tensor, TensorId};

use crate::base::cpu::cpu_tensor;

/// Gradients by parameter (f32, the parameter's element count), shared by the ops of one
/// forward pass and the trainer that differentiates it.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<Held>>);

/// The gradients a sink holds.
#[derive(Default)]
struct Held(HashMap<TensorId, Vec<f32>>);

impl Drop for Held {
    /// A gradient still here when the last handle goes was never applied: a graph built under a
    /// sink differentiated by a caller that did not read it back. Loud in debug builds (tests).
    fn drop(&mut self) {
        debug_assert!(
            self.0.is_empty() || std::thread::panicking(),
            "{} parameter gradient(s) dropped with their sink, never read back",
            self.0.len()
        );
    }
}

thread_local! {
    /// The sink of the forward pass running on this thread (`GradSink::during`).
    static ACTIVE: RefCell<Option<GradSink>> = const { RefCell::new(None) };
}

impl GradSink {
    /// Runs `forward` with this sink active on this thread: the host ops built meanwhile keep
    /// it (`GradSink::active`) and leave their weights' gradients here in the backward pass.
    pub fn during<R>(&self, forward: impl FnOnce() -> R) -> R {
        /// Restores the previous sink, also when `forward` panics.
        struct Restore(Option<GradSink>);
        impl Drop for Restore {
            fn drop(&mut self) {
                ACTIVE.with(|a| *a.borrow_mut() = self.0.take());
            }
        }
        let _restore = Restore(ACTIVE.with(|a| a.borrow_mut().replace(self.clone())));
        forward()
    }

    /// The sink of the forward pass running on this thread, if any (for an op being built).
    pub fn active() -> Option<GradSink> {
        ACTIVE.with(|a| a.borrow().clone())
    }

    /// Takes `grad` for `param` when `sink` is given and `param` is a variable (a leaf of the
    /// graph); otherwise hands it back, for candle to propagate. Gradients of one parameter
    /// from several ops add up.
    pub fn offer(sink: Option<&GradSink>, param: &Tensor, grad: Vec<f32>) -> Option<Vec<f32>> {
        let Some(sink) = sink.filter(|_| param.is_variable()) else {
            return Some(grad);
        };
        let mut held = sink.0.lock().expect("gradient sink poisoned");
        match held.0.get_mut(&param.id()) {
            Some(sum) => {
                assert_eq!(sum.len(), grad.len(), "one parameter, two gradient sizes");
                crate::base::cpu::add_assign(sum, &grad);
            }
            None => {
                held.0.insert(param.id(), grad);
            }
        }
        None
    }

    /// What a host op reports to candle for `param`'s gradient `grad`: nothing when `sink`
    /// takes it (`offer`), else `grad` as a tensor of `param`'s shape.
    pub fn route(
        sink: Option<&GradSink>,
        param: &Tensor,
        grad: Vec<f32>,
    ) -> candle_core::Result<Option<Tensor>> {
        Self::offer(sink, param, grad).map(|g| cpu_tensor(g, param.shape())).transpose()
    }

    /// The gradient left for `param`, if any; removes it.
    pub fn take(&self, param: &Tensor) -> Option<Vec<f32>> {
        self.0.lock().expect("gradient sink poisoned").0.remove(&param.id())
    }

    /// Fails when a gradient was left for a parameter nobody took (it would be lost); the
    /// leftovers are discarded with the error.
    pub fn finish(&self) -> Result<()> {
        let mut held = self.0.lock().expect("gradient sink poisoned");
        let left = held.0.len();
        held.0.clear();
        ensure!(
            left == 0,
            "{left} parameter gradient(s) left in the sink: not a trained parameter"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn takes_variables_only_and_sums_repeated_offers() {
        let sink = GradSink::default();
        let var = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let plain = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert_eq!(GradSink::offer(None, var.as_tensor(), vec![1.0, 1.0]), Some(vec![1.0, 1.0]));
        assert_eq!(GradSink::offer(Some(&sink), &plain, vec![3.0, 4.0]), Some(vec![3.0, 4.0]));
        assert_eq!(GradSink::offer(Some(&sink), var.as_tensor(), vec![0.5, 1.5]), None);
        // A clone of the variable's tensor is the same parameter.
        assert_eq!(GradSink::offer(Some(&sink), &var.as_tensor().clone(), vec![0.25, 0.0]), None);
        assert_eq!(sink.take(var.as_tensor()), Some(vec![0.75, 1.5]));
        assert_eq!(sink.take(var.as_tensor()), None);
        sink.finish().unwrap();
        GradSink::offer(Some(&sink), var.as_tensor(), vec![1.0, 1.0]);
        assert!(sink.finish().is_err(), "an untaken gradient is reported");
        sink.finish().unwrap();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped with their sink")]
    fn a_gradient_dropped_with_its_sink_is_loud() {
        let var = Var::new(&[1f32], &Device::Cpu).unwrap();
        GradSink::offer(Some(&GradSink::default()), var.as_tensor(), vec![1.0]);
    }

    #[test]
    fn a_sink_is_active_only_during_its_forward_pass() {
        let (outer, inner) = (GradSink::default(), GradSink::default());
        let same = |a: &GradSink, b: &GradSink| Arc::ptr_eq(&a.0, &b.0);
        assert!(GradSink::active().is_none());
        outer.during(|| {
            assert!(same(&GradSink::active().unwrap(), &outer));
            inner.during(|| assert!(same(&GradSink::active().unwrap(), &inner)));
            assert!(same(&GradSink::active().unwrap(), &outer), "the outer sink is restored");
            // Other threads (rayon's) see none.
            std::thread::scope(|s| {
                s.spawn(|| assert!(GradSink::active().is_none()));
            });
        });
        assert!(GradSink::active().is_none());
        let caught = std::panic::catch_unwind(|| outer.during(|| panic!("forward failed")));
        assert!(caught.is_err());
        assert!(GradSink::active().is_none(), "cleared after a panic too");
    }
}

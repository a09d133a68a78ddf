//! The learning-rate schedule of both trainers: linear warm-up (torchvision's LinearLR: from
//! `warmup_start`·lr at step 0 towards lr), then constant, linear, cosine or step decay.

use crate::base::config::ScheduleKind;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decay {
    Constant,
    /// To 0 at the last step.
    Linear,
    /// Half a cosine, to 0 at the last step.
    Cosine,
    /// × `gamma` every `every` steps, counted from the end of the warm-up (torchvision's StepLR
    /// after SequentialLR's milestone).
    Step {
        every: usize,
        gamma: f64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub base: f64,
    /// Steps of linear warm-up (0 = none).
    pub warmup: usize,
    /// The factor of `base` at step 0 of the warm-up.
    pub warmup_start: f64,
    pub decay: Decay,
    /// Steps of the whole run.
    pub total: usize,
}

impl Schedule {
    /// A schedule over `total` steps from a config's kind; `step_every` and `gamma` only matter
    /// for step decay.
    pub fn new(
        base: f64,
        kind: ScheduleKind,
        warmup: usize,
        warmup_start: f64,
        total: usize,
        step_every: usize,
        gamma: f64,
    ) -> Self {
        let decay = match kind {
            ScheduleKind::Constant => Decay::Constant,
            ScheduleKind::Linear => Decay::Linear,
            ScheduleKind::Cosine => Decay::Cosine,
            ScheduleKind::Step => Decay::Step { every: step_every.max(1), gamma },
        };
        Self { base, warmup, warmup_start, decay, total }
    }

    /// The learning rate of 0-based step `step`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            let t = step as f64 / self.warmup as f64;
            return self.base * (self.warmup_start + (1.0 - self.warmup_start) * t);
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        match self.decay {
            Decay::Constant => self.base,
            Decay::Linear => self.base * (1.0 - progress),
            Decay::Cosine => self.base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Step { every, gamma } => {
                self.base * gamma.powi(((step - self.warmup) / every) as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind, warmup: usize, total: usize) -> Schedule {
        Schedule::new(1.0, kind, warmup, 0.01, total, 30, 0.1)
    }

    #[test]
    fn warm_up_then_decay() {
        let s = schedule(ScheduleKind::Constant, 10, 100);
        assert_eq!(s.lr(0), 0.01);
        assert!((s.lr(5) - (0.01 + 0.99 * 0.5)).abs() < 1e-12);
        assert_eq!(s.lr(10), 1.0);
        assert_eq!(s.lr(99), 1.0);
        let s = schedule(ScheduleKind::Cosine, 10, 110);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert!(s.lr(109) < 0.01);
        let s = schedule(ScheduleKind::Linear, 10, 110);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert_eq!(schedule(ScheduleKind::Cosine, 0, 100).lr(0), 1.0);
    }

    #[test]
    fn step_decay_counts_from_the_first_step() {
        let s = schedule(ScheduleKind::Step, 0, 100);
        assert_eq!(s.lr(29), 1.0);
        assert!((s.lr(30) - 0.1).abs() < 1e-12);
        assert!((s.lr(95) - 1e-3).abs() < 1e-15);
        // After a warm-up, StepLR starts counting at the milestone.
        let s = schedule(ScheduleKind::Step, 5, 100);
        assert_eq!(s.lr(34), 1.0);
        assert!((s.lr(35) - 0.1).abs() < 1e-12);
    }
}

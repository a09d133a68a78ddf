//! Split names of the sets that ship a fixed train/test division (CIFAR, MNIST).

use anyhow::{bail, Result};

/// "train" or "test". These sets have no validation split; their test split is the held-out one,
/// so "val" and "validation" (the config's default eval split) name it too.
pub fn train_or_test(set: &str, split: &str) -> Result<&'static str> {
    match split {
        "train" => Ok("train"),
        "test" | "val" | "validation" => Ok("test"),
        other => bail!("{set} has no split {other:?}; use \"train\" or \"test\" (\"val\" is taken as \"test\")"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_unknown() {
        assert_eq!(train_or_test("cifar10", "val").unwrap(), "test");
        assert_eq!(train_or_test("cifar10", "train").unwrap(), "train");
        assert!(train_or_test("cifar10", "extra").unwrap_err().to_string().contains("\"extra\""));
    }
}

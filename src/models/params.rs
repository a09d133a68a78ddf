//! Named parameters of a trainable model: loaded from a checkpoint, each either trainable (a
//! `Var`, receives gradients) or frozen (a plain tensor), with its weight-decay group.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};

/// Which weight decay a parameter takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayGroup {
    /// Matrices and convolution kernels: `weight_decay`.
    Weights,
    /// Normalisation weights and every bias: `norm_weight_decay`.
    NormAndBias,
}

pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub var: Option<Var>,
    pub group: DecayGroup,
}

impl Param {
    /// The value to compute with: the Var when trainable.
    pub fn get(&self) -> &Tensor {
        match &self.var {
            Some(v) => v.as_tensor(),
            None => &self.tensor,
        }
    }
}

/// Every parameter of a model, by name, in creation order, all in one dtype.
pub struct ParamSet {
    pub params: Vec<Param>,
    index: HashMap<String, usize>,
    pub dtype: DType,
}

impl Default for ParamSet {
    fn default() -> Self {
        Self::new(DType::F32)
    }
}

impl ParamSet {
    pub fn new(dtype: DType) -> Self {
        Self { params: Vec::new(), index: HashMap::new(), dtype }
    }

    /// Adds a parameter with the given value (converted to the set's dtype).
    pub fn add(
        &mut self,
        name: &str,
        value: Tensor,
        trainable: bool,
        group: DecayGroup,
    ) -> Result<Tensor> {
        let value = value.to_dtype(self.dtype)?;
        let var = if trainable { Some(Var::from_tensor(&value)?) } else { None };
        let param = Param { name: name.to_string(), tensor: value, var, group };
        let t = param.get().clone();
        self.index.insert(name.to_string(), self.params.len());
        self.params.push(param);
        Ok(t)
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    /// The device of the parameters (the CPU for an empty set).
    pub fn device(&self) -> Device {
        self.params.first().map_or(Device::Cpu, |p| p.tensor.device().clone())
    }

    pub fn trainable(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.var.is_some())
    }

    /// Current values of every parameter (checkpoints, EMA).
    pub fn values(&self) -> HashMap<String, Tensor> {
        self.params.iter().map(|p| (p.name.clone(), p.get().detach())).collect()
    }
}

/// Tensors of a checkpoint, looked up by name with errors that name the file.
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub source: String,
}

impl Weights {
    pub fn load(paths: &[std::path::PathBuf], device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for p in paths {
            tensors.extend(
                candle_core::safetensors::load(p, device)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            );
        }
        Ok(Self {
            tensors,
            source: paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        })
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.source))?;
        anyhow::ensure!(
            t.dims() == shape,
            "{}: `{name}` has shape {:?}, expected {shape:?}",
            self.source,
            t.dims()
        );
        Ok(t.to_dtype(DType::F32)?)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn dims(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self
            .tensors
            .get(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.source))?
            .dims()
            .to_vec())
    }
}

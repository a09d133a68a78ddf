//! Per-row labels of a store, held in memory (they are small next to the features).

use anyhow::{ensure, Result};

use super::manifest::LabelKind;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Labels {
    None,
    /// One class id per row.
    Class(Vec<u32>),
    /// Row i holds `values[offsets[i]..offsets[i + 1]]`; `offsets` has rows + 1 entries.
    Multi {
        offsets: Vec<usize>,
        values: Vec<u32>,
    },
}

impl Labels {
    /// No rows yet, of the given kind.
    pub fn empty(kind: LabelKind) -> Self {
        match kind {
            LabelKind::None => Labels::None,
            LabelKind::Class => Labels::Class(Vec::new()),
            LabelKind::Multi => Labels::Multi { offsets: vec![0], values: Vec::new() },
        }
    }

    pub fn kind(&self) -> LabelKind {
        match self {
            Labels::None => LabelKind::None,
            Labels::Class(_) => LabelKind::Class,
            Labels::Multi { .. } => LabelKind::Multi,
        }
    }

    /// The labels of `row` (empty for `None`, one id for `Class`). Panics past the end, like slicing.
    pub fn row(&self, row: usize) -> &[u32] {
        match self {
            Labels::None => &[],
            Labels::Class(v) => std::slice::from_ref(&v[row]),
            Labels::Multi { offsets, values } => &values[offsets[row]..offsets[row + 1]],
        }
    }

    /// Appends one row; a class row takes exactly one id.
    pub fn push_row(&mut self, ids: &[u32]) -> Result<()> {
        match self {
            Labels::None => {
                ensure!(ids.is_empty(), "the store has no labels but a row came with {ids:?}")
            }
            Labels::Class(v) => {
                ensure!(ids.len() == 1, "class labels take one id per row, got {ids:?}");
                v.push(ids[0]);
            }
            Labels::Multi { offsets, values } => {
                values.extend_from_slice(ids);
                offsets.push(values.len());
            }
        }
        Ok(())
    }

    /// Appends the rows of `other` (same kind), e.g. the next shard's labels.
    pub fn extend(&mut self, other: Labels) -> Result<()> {
        match (self, other) {
            (Labels::None, Labels::None) => {}
            (Labels::Class(a), Labels::Class(b)) => a.extend(b),
            (Labels::Multi { offsets, values }, Labels::Multi { offsets: o2, values: v2 }) => {
                let base = values.len();
                offsets.extend(o2.iter().skip(1).map(|o| o + base));
                values.extend(v2);
            }
            (a, b) => anyhow::bail!("cannot append {} labels to {} labels", b.kind(), a.kind()),
        }
        Ok(())
    }

    /// Drops every row, keeping the kind.
    pub fn clear(&mut self) {
        *self = Labels::empty(self.kind());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_push_and_extend() {
        let mut m = Labels::empty(LabelKind::Multi);
        m.push_row(&[1, 2]).unwrap();
        m.push_row(&[]).unwrap();
        let mut n = Labels::empty(LabelKind::Multi);
        n.push_row(&[3]).unwrap();
        m.extend(n).unwrap();
        assert_eq!(m.row(0), &[1, 2]);
        assert!(m.row(1).is_empty());
        assert_eq!(m.row(2), &[3]);

        let mut c = Labels::empty(LabelKind::Class);
        assert!(c.push_row(&[1, 2]).is_err());
        c.push_row(&[4]).unwrap();
        assert_eq!(c.row(0), &[4]);
        assert!(c.extend(Labels::None).is_err());
        assert!(Labels::None.push_row(&[1]).is_err());
    }
}

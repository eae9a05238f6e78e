//! kohya's `--optimizer_args key=value` values: numbers and tuples of numbers, as Python's
//! `ast.literal_eval` reads them (`0.01`, `1e-8`, `(0.9, 0.999)`, `[0.9,0.999]`, `0.9,0.999`).

use std::collections::BTreeMap;

use super::state::OptimizerError;

/// Reads the keys an optimizer knows, then refuses any key left over.
pub(crate) struct OptimizerArgs<'a> {
    optimizer: &'static str,
    args: &'a BTreeMap<String, String>,
    used: Vec<&'static str>,
}

pub(crate) fn invalid(optimizer: &str, message: &str) -> OptimizerError {
    OptimizerError::Args(format!("optimizer_args for {optimizer}: {message}"))
}

impl<'a> OptimizerArgs<'a> {
    pub(crate) fn new(optimizer: &'static str, args: &'a BTreeMap<String, String>) -> Self {
        Self {
            optimizer,
            args,
            used: Vec::new(),
        }
    }

    /// A number argument.
    pub(crate) fn float(&mut self, key: &'static str) -> Result<Option<f64>, OptimizerError> {
        Ok(self.floats::<1>(key)?.map(|[v]| v))
    }

    /// A tuple of exactly `N` numbers (a single number when `N` is 1).
    pub(crate) fn floats<const N: usize>(
        &mut self,
        key: &'static str,
    ) -> Result<Option<[f64; N]>, OptimizerError> {
        self.used.push(key);
        let Some(raw) = self.args.get(key) else {
            return Ok(None);
        };
        let bad = || {
            let want = if N == 1 {
                "a number".to_owned()
            } else {
                format!("{N} numbers, e.g. `(0.9, 0.999)`")
            };
            invalid(self.optimizer, &format!("`{key}={raw}` must be {want}"))
        };
        let inner = raw.trim();
        let inner = inner
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .or_else(|| inner.strip_prefix('[').and_then(|s| s.strip_suffix(']')))
            .unwrap_or(inner);
        let mut parts: Vec<&str> = inner.split(',').map(str::trim).collect();
        if parts.len() > 1 && parts.last() == Some(&"") {
            parts.pop(); // Python's one-element tuple `(0.9,)`
        }
        if parts.len() != N {
            return Err(bad());
        }
        let mut out = [0.0; N];
        for (slot, part) in out.iter_mut().zip(&parts) {
            *slot = part
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(bad)?;
        }
        Ok(Some(out))
    }

    /// Refuses keys the optimizer does not know.
    pub(crate) fn finish(&self) -> Result<(), OptimizerError> {
        let unknown: Vec<&str> = self
            .args
            .keys()
            .map(String::as_str)
            .filter(|k| !self.used.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(invalid(
            self.optimizer,
            &format!(
                "unknown {} (known: {})",
                unknown.join(", "),
                self.used.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_as_literal_eval_reads_them() {
        let cases: [(&str, Option<[f64; 2]>); 8] = [
            ("(0.9, 0.999)", Some([0.9, 0.999])),
            ("[0.9,0.999]", Some([0.9, 0.999])),
            ("0.9,0.999", Some([0.9, 0.999])),
            (" ( 1e-8 , 2 ) ", Some([1e-8, 2.0])),
            ("(0.9, 0.999,)", Some([0.9, 0.999])),
            ("(0.9)", None),
            ("(0.9, 0.99, 0.999)", None),
            ("(0.9, inf)", None),
        ];
        for (raw, want) in cases {
            let map = BTreeMap::from([("betas".to_owned(), raw.to_owned())]);
            let got = OptimizerArgs::new("X", &map).floats::<2>("betas");
            assert_eq!(got.ok().flatten(), want, "{raw}");
        }
        let map = BTreeMap::from([("wd".to_owned(), "(0.5,)".to_owned())]);
        assert_eq!(
            OptimizerArgs::new("X", &map).float("wd").unwrap(),
            Some(0.5)
        );
    }
}

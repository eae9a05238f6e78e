//! Comparing LoRAs by what they do: the relative Frobenius error between their deltas
//! (`alpha / rank * up @ down`), never factor by factor (SVD factors are unique only up to
//! sign and rotation). Computed exactly from the factors, without full matrices.

use faer::Mat;

use crate::Lora;
use crate::error::LoraError;
use crate::linalg;
use crate::module::Module;

/// `||delta_a - delta_b||_F / ||delta_b||_F` over all modules together (`b` is the
/// reference). A module present in only one LoRA counts against a zero delta. Shapes that
/// disagree are an error naming the module and both shapes.
pub fn delta_relative_error(a: &Lora, b: &Lora) -> Result<f64, LoraError> {
    let mut diff2 = 0.0;
    let mut ref2 = 0.0;
    let names: std::collections::BTreeSet<&String> =
        a.modules.keys().chain(b.modules.keys()).collect();
    for name in names {
        match (a.modules.get(name), b.modules.get(name)) {
            (Some(ma), Some(mb)) => {
                check_same_shape(name, ma, mb)?;
                diff2 += difference_norm(ma, mb).powi(2);
                ref2 += mb.delta_norm().powi(2);
            }
            (Some(ma), None) => diff2 += ma.delta_norm().powi(2),
            (None, Some(mb)) => {
                let n2 = mb.delta_norm().powi(2);
                diff2 += n2;
                ref2 += n2;
            }
            (None, None) => {}
        }
    }
    Ok(relative(diff2.sqrt(), ref2.sqrt()))
}

/// The relative delta error of one module against a reference module.
pub fn module_delta_relative_error(a: &Module, reference: &Module) -> Result<f64, LoraError> {
    check_same_shape("<module>", a, reference)?;
    Ok(relative(
        difference_norm(a, reference),
        reference.delta_norm(),
    ))
}

fn relative(diff: f64, reference: f64) -> f64 {
    if reference == 0.0 {
        if diff == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        diff / reference
    }
}

fn check_same_shape(name: &str, a: &Module, b: &Module) -> Result<(), LoraError> {
    if a.same_base_shape(b) {
        Ok(())
    } else {
        Err(LoraError::ShapeMismatch {
            module: name.to_string(),
            first_input: 1,
            first_shape: a.base_shape_label(),
            second_input: 2,
            second_shape: b.base_shape_label(),
        })
    }
}

/// `||delta_a - delta_b||_F` as the norm of the low-rank product `[sa*Ua, -sb*Ub] [Da; Db]`.
fn difference_norm(a: &Module, b: &Module) -> f64 {
    let (out, in_flat) = (a.out_dim, a.in_flat());
    let r = a.rank + b.rank;
    let mut left = Mat::<f64>::zeros(out, r);
    let mut right_t = Mat::<f64>::zeros(in_flat, r);
    let sa = f64::from(a.scale());
    let sb = -f64::from(b.scale());
    left.as_mut()
        .subcols_mut(0, a.rank)
        .copy_from(linalg::mat_from_rows(&a.up, out, a.rank, sa));
    left.as_mut()
        .subcols_mut(a.rank, b.rank)
        .copy_from(linalg::mat_from_rows(&b.up, out, b.rank, sb));
    right_t
        .as_mut()
        .subcols_mut(0, a.rank)
        .copy_from(linalg::mat_from_rows_transposed(&a.down, a.rank, in_flat));
    right_t
        .as_mut()
        .subcols_mut(a.rank, b.rank)
        .copy_from(linalg::mat_from_rows_transposed(&b.down, b.rank, in_flat));
    if r >= out.min(in_flat) {
        return (&left * right_t.transpose()).norm_l2();
    }
    linalg::low_rank_norm(left.as_ref(), right_t.as_ref())
}

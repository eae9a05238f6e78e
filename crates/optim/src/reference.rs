//! Test support: the step-by-step comparison of an optimizer with the reference fixtures of
//! `tests/fixtures/optim/` (read through [`slider_models::fixtures`]).

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use slider_models::HostTensor;

pub(crate) use slider_models::fixtures::{PARAMS, device, fixture, max_error, read, rel_error};

use super::{Optimizer, OptimizerState};

/// One configuration of an optimizer run by the reference on the shared inputs.
pub(crate) struct Case {
    pub name: String,
    /// The case's JSON (hyperparameters and `lrs`).
    pub config: serde_json::Value,
    pub lrs: Vec<f64>,
    /// `step<k>.<p>`: the parameter after step k + 1; `state.<p>.<slot>`: the final state.
    pub expected: BTreeMap<String, HostTensor>,
}

pub(crate) fn optimizer_cases(file: &str) -> Vec<Case> {
    let (tensors, metadata) = read(file);
    let cases: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&metadata["cases"]).unwrap();
    cases
        .into_iter()
        .map(|(name, config)| {
            let prefix = format!("{name}.");
            let expected = tensors
                .iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_owned(), t.clone())))
                .collect();
            let lrs = config["lrs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            Case {
                name,
                config,
                lrs,
                expected,
            }
        })
        .collect()
}

/// Initial parameters and per-step gradients.
pub(crate) fn inputs() -> (
    BTreeMap<String, HostTensor>,
    Vec<BTreeMap<String, HostTensor>>,
) {
    let (tensors, _) = read("inputs.safetensors");
    let init = PARAMS
        .iter()
        .map(|p| (p.to_string(), tensors[&format!("init.{p}")].clone()))
        .collect();
    let grads = (0..)
        .map_while(|k| {
            PARAMS
                .iter()
                .map(|p| {
                    Some((
                        p.to_string(),
                        tensors.get(&format!("grad.{k}.{p}"))?.clone(),
                    ))
                })
                .collect::<Option<BTreeMap<_, _>>>()
        })
        .collect();
    (init, grads)
}

fn upload<const D: usize>(t: &HostTensor) -> Tensor<D> {
    let dims: [usize; D] = t.shape.clone().try_into().unwrap();
    Tensor::from_data(TensorData::new(t.values.clone(), dims), &device())
}

fn step_rank<const D: usize>(
    opt: &mut Optimizer,
    name: &str,
    lr: f64,
    param: &HostTensor,
    grad: &HostTensor,
) -> HostTensor {
    let out = opt
        .step::<D>(name, lr, upload(param), upload(grad))
        .unwrap();
    HostTensor {
        shape: out.dims().to_vec(),
        values: out.into_data().try_to_vec::<f32>().unwrap(),
    }
}

/// Steps a host parameter of rank 1, 2 or 4.
pub(crate) fn step_host(
    opt: &mut Optimizer,
    name: &str,
    lr: f64,
    param: &HostTensor,
    grad: &HostTensor,
) -> HostTensor {
    match param.shape.len() {
        1 => step_rank::<1>(opt, name, lr, param, grad),
        2 => step_rank::<2>(opt, name, lr, param, grad),
        4 => step_rank::<4>(opt, name, lr, param, grad),
        r => panic!("rank {r}"),
    }
}

/// Tolerances: parameters after each step (f32, relative Frobenius and largest element), the step itself
/// (`p_k - p_{k-1}`, whose rounding is relative to the much larger parameter), final state.
const PARAM_TOL: f64 = 1e-6;
const UPDATE_TOL: f64 = 1e-4;
const STATE_TOL: f64 = 1e-5;

/// Runs the optimizer over the fixture gradients and compares every step and the final state.
pub(crate) fn check_against(opt: &mut Optimizer, case: &Case, label: &str) {
    let (init, grads) = inputs();
    assert_eq!(grads.len(), case.lrs.len());
    let mut params = init;
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for (k, (step_grads, &lr)) in grads.iter().zip(&case.lrs).enumerate() {
        for p in PARAMS {
            let before = &params[p];
            let after = step_host(opt, p, lr, before, &step_grads[p]);
            let want = &case.expected[&format!("step{k}.{p}")];
            assert_eq!(after.shape, want.shape);
            let param_err =
                rel_error(&after.values, &want.values).max(max_error(&after.values, &want.values));
            let delta = |t: &HostTensor| -> Vec<f32> {
                t.values
                    .iter()
                    .zip(&before.values)
                    .map(|(a, b)| a - b)
                    .collect()
            };
            let update_err = rel_error(&delta(&after), &delta(want));
            assert!(
                param_err < PARAM_TOL && update_err < UPDATE_TOL,
                "{label} {} step {k} {p}: parameter error {param_err:e}, update error {update_err:e}",
                case.name
            );
            worst.0 = worst.0.max(param_err);
            worst.1 = worst.1.max(update_err);
            params.insert(p.to_owned(), after);
        }
    }
    let state = opt.state();
    let mut slots = 0;
    for (key, want) in &case.expected {
        let Some(slot_key) = key.strip_prefix("state.") else {
            continue;
        };
        let got = state
            .tensors
            .get(slot_key)
            .unwrap_or_else(|| panic!("{label}: no `{slot_key}`"));
        assert_eq!(got.shape, want.shape, "{label} {slot_key}");
        let err = rel_error(&got.values, &want.values);
        assert!(
            err < STATE_TOL,
            "{label} {} state {slot_key}: error {err:e}",
            case.name
        );
        worst.2 = worst.2.max(err);
        slots += 1;
    }
    assert_eq!(
        slots,
        state.tensors.len(),
        "{label}: the reference has other state slots"
    );
    for p in PARAMS {
        assert_eq!(state.steps[p], grads.len() as u64);
    }
    eprintln!(
        "{label} {}: worst relative error: parameters {:.2e}, updates {:.2e}, state {:.2e}",
        case.name, worst.0, worst.1, worst.2
    );
}

/// Runs the case straight through and with a save/load after every possible step; the final
/// parameters must be bit-identical.
pub(crate) fn check_resume(
    case: &Case,
    fresh: impl Fn() -> Optimizer,
    restore: impl Fn(&OptimizerState) -> Optimizer,
) {
    let (init, grads) = inputs();
    let run = |stop: Option<usize>| -> BTreeMap<String, HostTensor> {
        let mut opt = fresh();
        let mut params = init.clone();
        for (k, (step_grads, &lr)) in grads.iter().zip(&case.lrs).enumerate() {
            if Some(k) == stop {
                let bytes = opt.state().to_bytes().unwrap();
                opt = restore(&OptimizerState::from_bytes(&bytes).unwrap());
            }
            for p in PARAMS {
                let after = step_host(&mut opt, p, lr, &params[p], &step_grads[p]);
                params.insert(p.to_owned(), after);
            }
        }
        params
    };
    let straight = run(None);
    for stop in 1..grads.len() {
        let resumed = run(Some(stop));
        for p in PARAMS {
            let bits = |t: &HostTensor| t.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&resumed[p]),
                bits(&straight[p]),
                "resumed after step {stop}: {p}"
            );
        }
    }
}

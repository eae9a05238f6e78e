//! Training and scoring the eye meter. Every step draws a fresh batch from the toy world
//! (random identity, view and eye size, augmented), so the meter never sees an image twice;
//! held-out scoring draws from a different seed. The loss is a weighted sum: squared error of
//! the eye size, logistic loss of each slot's presence, squared error of the present boxes,
//! and the logistic loss of every eye-mask cell against the share of it inside an eye (the
//! ellipse inscribed in an eye box is exactly the eye's outline).
//! AdamW (ours, torch's arithmetic) with a linear warm-up and a cosine decay.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use burn::tensor::activation::softplus;
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slider_toyworld::{Identity, View, render};

use super::augment::{FloatImage, augment};
use super::net::{INPUT_SIZE, MASK_SIZE, Net, OUTPUTS, Param};
use super::{EyeMeter, EyeMeterError};
use crate::stats::spearman;
use slider_optim::{AdamW, AdamWConfig};

/// Mixed into the seed for held-out images, so they never coincide with training images.
const HELD_OUT_SALT: u64 = 0x6865_6c64_5f6f_7574;

/// Loss weights per output column kind.
const SIZE_WEIGHT: f32 = 20.0;
const BOX_WEIGHT: f32 = 3.0;
/// Share of the steps trained on plain renders before augmentations phase in.
const PLAIN_SHARE: f64 = 0.25;
/// Highest share of augmented images in a batch, reached at half the steps.
const MAX_AUGMENTED: f64 = 0.8;
/// Weight of the eye mask's logistic loss, summed over its cells.
const MASK_WEIGHT: f32 = 0.05;

/// How to train the meter.
#[derive(Debug, Clone, PartialEq)]
pub struct EyeMeterTrainConfig {
    /// Seeds the initial weights and every training image.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (after warm-up), decayed by a cosine to 5% at the last step.
    pub learning_rate: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
}

impl Default for EyeMeterTrainConfig {
    fn default() -> Self {
        EyeMeterTrainConfig {
            seed: 0,
            steps: 2800,
            batch: 8,
            learning_rate: 1e-3,
            warmup: 30,
        }
    }
}

impl EyeMeterTrainConfig {
    /// The share of augmented images at `step`: none for the first quarter of the steps (the
    /// eye-size cue is found far sooner on plain renders), then rising to 80% at half-way.
    pub fn augmented_share(&self, step: usize) -> f64 {
        let t = step as f64 / self.steps.max(1) as f64;
        ((t - PLAIN_SHARE) / (0.5 - PLAIN_SHARE)).clamp(0.0, 1.0) * MAX_AUGMENTED
    }

    /// The learning rate at `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.learning_rate * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = 0.05;
        self.learning_rate
            * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    }
}

/// Reported after every step.
#[derive(Debug, Clone, Copy)]
pub struct TrainProgress {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
}

/// What training did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: usize,
    pub seconds: f64,
    /// Loss of every step.
    pub losses: Vec<f32>,
    pub parameters: usize,
}

/// The meter's accuracy on held-out images of one view.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewAccuracy {
    pub view: View,
    pub images: usize,
    /// Mean absolute error of the eye size (the size runs over `[0, 1]`).
    pub mae: f64,
    /// Spearman correlation of measured and true eye size.
    pub spearman: f64,
    /// Share of images with the right number of eyes found.
    pub eye_count_accuracy: f64,
    /// Mean absolute error of box coordinates in pixels of a 64 px image, over images whose
    /// eye count is right.
    pub box_mae_px: f64,
}

/// Trains a meter from scratch; `progress` is called after every step.
pub fn train_eye_meter(
    config: &EyeMeterTrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<(EyeMeter, TrainReport), EyeMeterError> {
    if config.steps == 0 || config.batch == 0 {
        return Err(EyeMeterError::Config(
            "steps and batch must both be at least 1".into(),
        ));
    }
    let start = Instant::now();
    let mut init_rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut net = Net::init(&mut init_rng, device);
    let mut optimizer = AdamW::new(AdamWConfig {
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
    });
    let mut losses = Vec::with_capacity(config.steps);
    for step in 0..config.steps {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(step as u64 + 1);
        let batch = Batch::draw(&mut rng, config.batch, config.augmented_share(step), device);
        let tracked = Net {
            params: net
                .params
                .iter()
                .map(|(k, p)| (k.clone(), p.tracked()))
                .collect(),
            ..net.clone()
        };
        let (pred, mask) = tracked.forward_with_mask(batch.input.clone());
        let loss = batch.loss(pred, mask);
        let grads = loss.backward();
        let value = loss.into_scalar::<f32>();
        if !value.is_finite() {
            return Err(EyeMeterError::Diverged {
                step: step + 1,
                loss: value,
            });
        }
        let lr = config.lr_at(step);
        let mut next = BTreeMap::new();
        for (name, param) in &tracked.params {
            next.insert(name.clone(), param.step(name, lr, &grads, &mut optimizer)?);
        }
        net.params = next;
        losses.push(value);
        if (step + 1) % 25 == 0 {
            let recent = &losses[losses.len().saturating_sub(25)..];
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            tracing::info!(step = step + 1, loss = mean, lr, "eye meter training");
        }
        progress(TrainProgress {
            step: step + 1,
            steps: config.steps,
            loss: value,
        });
    }
    let parameters = net.parameter_count();
    let metadata = HashMap::from([
        ("seed".to_string(), config.seed.to_string()),
        ("steps".to_string(), config.steps.to_string()),
        ("batch".to_string(), config.batch.to_string()),
        (
            "learning_rate".to_string(),
            config.learning_rate.to_string(),
        ),
    ]);
    let report = TrainReport {
        steps: config.steps,
        seconds: start.elapsed().as_secs_f64(),
        losses,
        parameters,
    };
    Ok((EyeMeter::from_net(net, metadata), report))
}

/// Scores `meter` on `per_view` held-out images of each view drawn from `seed` (never the
/// training images of any seed), plain renders or `augmented` ones.
pub fn evaluate(
    meter: &EyeMeter,
    seed: u64,
    per_view: usize,
    augmented: bool,
) -> Result<Vec<ViewAccuracy>, EyeMeterError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ HELD_OUT_SALT);
    let mut out = Vec::new();
    for view in View::ALL {
        let samples: Vec<Sample> = (0..per_view)
            .map(|_| Sample::draw(&mut rng, Some(view), augmented))
            .collect();
        let images: Vec<RgbImage> = samples.iter().map(Sample::to_rgb).collect();
        let readings = meter.measure_batch(&images)?;
        let truth: Vec<f64> = samples.iter().map(|s| s.eye_size as f64).collect();
        let measured: Vec<f64> = readings.iter().map(|r| r.eye_size as f64).collect();
        let mae = truth
            .iter()
            .zip(&measured)
            .map(|(t, m)| (t - m).abs())
            .sum::<f64>()
            / per_view.max(1) as f64;
        let (mut right_count, mut box_err, mut box_n) = (0usize, 0.0f64, 0usize);
        for (s, r) in samples.iter().zip(&readings) {
            if s.boxes.len() != r.eye_boxes.len() {
                continue;
            }
            right_count += 1;
            for (t, m) in s.boxes.iter().zip(&r.eye_boxes) {
                for (a, b) in t.iter().zip(m) {
                    box_err += (a - b).abs() as f64;
                    box_n += 1;
                }
            }
        }
        out.push(ViewAccuracy {
            view,
            images: per_view,
            mae,
            spearman: spearman(&truth, &measured).unwrap_or(f64::NAN),
            eye_count_accuracy: right_count as f64 / per_view.max(1) as f64,
            box_mae_px: if box_n > 0 {
                box_err / box_n as f64
            } else {
                f64::NAN
            },
        });
    }
    Ok(out)
}

/// One training or scoring image with its truth.
struct Sample {
    image: FloatImage,
    eye_size: f32,
    /// Eye boxes in pixels, left to right.
    boxes: Vec<[f32; 4]>,
}

impl Sample {
    fn draw(rng: &mut ChaCha8Rng, view: Option<View>, augmented: bool) -> Sample {
        let identity = Identity::sample(rng);
        let view = view.unwrap_or(View::ALL[rng.random_range(0..3)]);
        let eye_size = rng.random_range(0.0..=1.0);
        Sample::drawn(&identity, view, eye_size, augmented.then_some(rng))
    }

    /// Two images of one identity and view that differ only in eye size, augmented alike:
    /// within such a pair everything but the eyes cancels, which steers the gradient of the
    /// eye-size loss to the eyes.
    fn draw_pair(rng: &mut ChaCha8Rng, augmented: bool) -> [Sample; 2] {
        let identity = Identity::sample(rng);
        let view = View::ALL[rng.random_range(0..3)];
        let sizes: [f32; 2] = [rng.random_range(0.0..=1.0), rng.random_range(0.0..=1.0)];
        let augment_seed: u64 = rng.random();
        sizes.map(|e| {
            let mut same = ChaCha8Rng::seed_from_u64(augment_seed);
            Sample::drawn(&identity, view, e, augmented.then_some(&mut same))
        })
    }

    fn drawn(
        identity: &Identity,
        view: View,
        eye_size: f32,
        augment_rng: Option<&mut ChaCha8Rng>,
    ) -> Sample {
        let drawn = render(identity, view, eye_size, INPUT_SIZE as u32);
        let mut image = FloatImage::from_rgb(&drawn.image);
        let mut boxes = drawn.eye_boxes;
        if let Some(rng) = augment_rng {
            augment(&mut image, &mut boxes, rng);
        }
        Sample {
            image,
            eye_size,
            boxes,
        }
    }

    fn to_rgb(&self) -> RgbImage {
        let n = self.image.size as u32;
        let raw = self
            .image
            .data
            .iter()
            .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        RgbImage::from_raw(n, n, raw).unwrap_or_else(|| RgbImage::new(n, n))
    }
}

/// A batch on the device: input, targets and per-column loss weights.
struct Batch {
    input: Tensor<4>,
    target: Tensor<2>,
    squared_weight: Tensor<2>,
    logistic_weight: Tensor<2>,
    /// Share of each mask cell inside an eye, `[batch, 1, 32, 32]`.
    mask: Tensor<4>,
    size: usize,
}

impl Batch {
    fn draw(rng: &mut ChaCha8Rng, size: usize, augmented: f64, device: &Device) -> Batch {
        let mut pixels = Vec::with_capacity(size * 3 * INPUT_SIZE * INPUT_SIZE);
        let mut target = Vec::with_capacity(size * OUTPUTS);
        let mut squared = Vec::with_capacity(size * OUTPUTS);
        let mut logistic = Vec::with_capacity(size * OUTPUTS);
        let mut mask = Vec::with_capacity(size * MASK_SIZE * MASK_SIZE);
        let mut samples = Vec::with_capacity(size + 1);
        while samples.len() < size {
            let augment = rng.random_bool(augmented.clamp(0.0, 1.0));
            samples.extend(Sample::draw_pair(rng, augment));
        }
        samples.truncate(size);
        for s in samples {
            s.image.push_chw(&mut pixels);
            push_coverage(&s.boxes, &mut mask);
            target.push(s.eye_size);
            squared.push(SIZE_WEIGHT);
            logistic.push(0.0);
            for slot in 0..2 {
                match s.boxes.get(slot) {
                    Some(b) => {
                        target.push(1.0);
                        target.extend(b.iter().map(|v| v / INPUT_SIZE as f32));
                        squared.extend([0.0, BOX_WEIGHT, BOX_WEIGHT, BOX_WEIGHT, BOX_WEIGHT]);
                    }
                    None => {
                        target.extend([0.0; 5]);
                        squared.extend([0.0; 5]);
                    }
                }
                logistic.extend([1.0, 0.0, 0.0, 0.0, 0.0]);
            }
        }
        let two = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [size, OUTPUTS]), device);
        Batch {
            input: Tensor::from_data(
                TensorData::new(pixels, [size, 3, INPUT_SIZE, INPUT_SIZE]),
                device,
            ),
            target: two(target),
            squared_weight: two(squared),
            logistic_weight: two(logistic),
            mask: Tensor::from_data(
                TensorData::new(mask, [size, 1, MASK_SIZE, MASK_SIZE]),
                device,
            ),
            size,
        }
    }

    /// Mean over the batch of the weighted squared and logistic losses.
    fn loss(&self, pred: Tensor<2>, mask: Tensor<4>) -> Tensor<1> {
        let diff = pred.clone() - self.target.clone();
        let squared = (diff.clone() * diff * self.squared_weight.clone()).sum();
        let logistic = ((softplus(pred.clone(), 1.0) - pred * self.target.clone())
            * self.logistic_weight.clone())
        .sum();
        let mask_loss = (softplus(mask.clone(), 1.0) - mask * self.mask.clone())
            .sum()
            .mul_scalar(MASK_WEIGHT as f64);
        (squared + logistic + mask_loss).div_scalar(self.size as f64)
    }
}

/// Appends the eye mask target of one image: for each mask cell, the share of 8x8 sample
/// points inside the ellipse inscribed in any eye box.
fn push_coverage(boxes: &[[f32; 4]], out: &mut Vec<f32>) {
    let cell = (INPUT_SIZE / MASK_SIZE) as f32;
    const SUB: usize = 8;
    for cy in 0..MASK_SIZE {
        for cx in 0..MASK_SIZE {
            let mut inside = 0;
            for sy in 0..SUB {
                for sx in 0..SUB {
                    let x = (cx as f32 + (sx as f32 + 0.5) / SUB as f32) * cell;
                    let y = (cy as f32 + (sy as f32 + 0.5) / SUB as f32) * cell;
                    let hit = boxes.iter().any(|b| {
                        let (rx, ry) = ((b[2] - b[0]) / 2.0, (b[3] - b[1]) / 2.0);
                        let dx = (x - (b[0] + rx)) / rx;
                        let dy = (y - (b[1] + ry)) / ry;
                        dx * dx + dy * dy <= 1.0
                    });
                    inside += usize::from(hit);
                }
            }
            out.push(inside as f32 / (SUB * SUB) as f32);
        }
    }
}

impl Param {
    fn tracked(&self) -> Param {
        match self {
            Param::Conv(t) => Param::Conv(t.clone().autodiff().require_grad()),
            Param::Dense(t) => Param::Dense(t.clone().autodiff().require_grad()),
            Param::Bias(t) => Param::Bias(t.clone().autodiff().require_grad()),
        }
    }

    /// One optimizer step from this tracked parameter's gradient; the result is untracked.
    fn step(
        &self,
        name: &str,
        lr: f64,
        grads: &Gradients,
        optimizer: &mut AdamW,
    ) -> Result<Param, EyeMeterError> {
        let missing = || EyeMeterError::Config(format!("no gradient reached `{name}`"));
        Ok(match self {
            Param::Conv(t) => {
                let g = t.grad(grads).ok_or_else(missing)?;
                Param::Conv(optimizer.step(name, lr, t.clone().without_autodiff(), g)?)
            }
            Param::Dense(t) => {
                let g = t.grad(grads).ok_or_else(missing)?;
                Param::Dense(optimizer.step(name, lr, t.clone().without_autodiff(), g)?)
            }
            Param::Bias(t) => {
                let g = t.grad(grads).ok_or_else(missing)?;
                Param::Bias(optimizer.step(name, lr, t.clone().without_autodiff(), g)?)
            }
        })
    }
}

//! The text-to-image loop of diffusers' `StableDiffusionPipeline` (and its XL variant) on our
//! models: encode both prompts, draw the seeded initial latent, at every step run the (LoRA-adapted) UNet on the
//! negative and positive halves as one batch of two, combine them with the guidance scale,
//! step the sampler, then decode with the VAE.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::schedule::Scheduler;
use super::{SampleError, SampleJob};
use crate::checkpoint::{Checkpoint, Family, StableDiffusion};
use crate::clip::ClipTextModel;
use crate::ddpm::standard_normal;
use crate::diffusers_config::BaseConfig;
use crate::lora::LoraNetwork;
use crate::tokenizer::{Padding, Tokenizer};
use crate::unet::UNet;
use crate::vae::Vae;

/// RNG stream of the initial latent; ancestral noise comes from another stream of the same
/// seed, so every sampler starts from the same latent for a given seed.
const LATENT_STREAM: u64 = 0;
const ANCESTRAL_STREAM: u64 = 1;

/// A base model (SD1 or SDXL family) ready to generate images.
pub struct Generator {
    pub(crate) model: StableDiffusion,
    tokenizer: Tokenizer,
    device: Device,
    /// Prompt -> text conditioning: grids reuse a handful of prompts for every cell.
    encoded: Mutex<HashMap<String, Conditioning>>,
}

/// One prompt's text conditioning.
#[derive(Debug, Clone)]
struct Conditioning {
    /// Cross-attention context `[1, 77, d]`: CLIP-L's last layer (SD1), or CLIP-L's and bigG's
    /// penultimate layers side by side (SDXL).
    context: Tensor<3>,
    /// SDXL: bigG's pooled, projected embedding `[1, 1280]`.
    pooled: Option<Tensor<2>>,
}

impl Conditioning {
    fn zeros_like(&self) -> Self {
        Self {
            context: self.context.zeros_like(),
            pooled: self.pooled.as_ref().map(Tensor::zeros_like),
        }
    }
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("model", &self.model.spec.name())
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// Loads the single-file checkpoint `base` onto `device`.
    pub fn load(base: &Path, device: &Device) -> Result<Self, SampleError> {
        Self::load_with(base, &BaseConfig::none(), device)
    }

    /// [`Generator::load`] with the architecture completed by diffusers configs.
    pub fn load_with(
        base: &Path,
        config: &BaseConfig,
        device: &Device,
    ) -> Result<Self, SampleError> {
        let ckpt = Checkpoint::open(base)?;
        Self::from_model(StableDiffusion::load_with(&ckpt, config, device)?, device)
    }

    /// Wraps a loaded model; it needs its VAE and text encoder(s).
    pub fn from_model(model: StableDiffusion, device: &Device) -> Result<Self, SampleError> {
        if model.spec.family == Family::Sdxl && model.text_g.is_none() {
            return Err(SampleError::MissingPart("OpenCLIP bigG text encoder"));
        }
        if model.vae.is_none() {
            return Err(SampleError::MissingPart("VAE"));
        }
        if model.text_l.is_none() {
            return Err(SampleError::MissingPart("CLIP-L text encoder"));
        }
        Ok(Self {
            model,
            tokenizer: Tokenizer::clip()?,
            device: device.clone(),
            encoded: Mutex::new(HashMap::new()),
        })
    }

    /// What width and height must be multiples of: the VAE's downsampling times the UNet's.
    pub fn pixel_multiple(&self) -> usize {
        self.model.spec.pixel_multiple()
    }

    /// The image `job` describes, with each `(lora, weight)` added to the UNet in turn (an
    /// empty slice samples the base model).
    pub fn generate(
        &self,
        job: &SampleJob,
        loras: &[(&slider_lora::Lora, f64)],
    ) -> Result<image::RgbImage, SampleError> {
        self.generate_with_progress(job, loras, |_, _| {})
    }

    /// [`Generator::generate`], calling `progress(step, steps)` after every sampler step.
    pub fn generate_with_progress(
        &self,
        job: &SampleJob,
        loras: &[(&slider_lora::Lora, f64)],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<image::RgbImage, SampleError> {
        let multiple = self.pixel_multiple();
        let (width, height) = (job.width, job.height);
        if width == 0 || height == 0 || width % multiple != 0 || height % multiple != 0 {
            return Err(SampleError::Size {
                width,
                height,
                multiple,
            });
        }
        let scheduler = Scheduler::new(job.sampler, job.steps)?;
        let unet = self.adapted_unet(loras)?;
        let guided = job.cfg_scale > 1.0;
        let positive = self.encode(&job.prompt)?;
        let conditioning = if guided {
            let negative = self.negative(job, &positive)?;
            let pooled = match (negative.pooled, positive.pooled) {
                (Some(n), Some(p)) => Some(Tensor::cat(vec![n, p], 0)),
                _ => None,
            };
            Conditioning {
                context: Tensor::cat(vec![negative.context, positive.context], 0),
                pooled,
            }
        } else {
            positive
        };
        let added = conditioning
            .pooled
            .map(|pooled| self.added_conditioning(&unet, pooled, job));
        let latent_factor = multiple >> self.model.spec.unet.channel_mult.len().saturating_sub(1);
        let shape = [
            1,
            self.model.spec.unet.in_channels,
            height / latent_factor,
            width / latent_factor,
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(job.seed);
        rng.set_stream(LATENT_STREAM);
        let noise = standard_normal(&mut rng, shape, &self.device);
        let latents = self.denoise(
            job,
            scheduler,
            &unet,
            conditioning.context,
            added,
            noise,
            &mut progress,
        )?;
        self.decode(latents)
    }

    /// The sampling loop from the standard-normal `noise` (scaled here by the sampler's
    /// initial sigma) with `context` (`[negative; positive]` when guided, else the positive
    /// alone) and, for SDXL, the added conditioning in the same order: diffusers'
    /// `StableDiffusionPipeline` / `StableDiffusionXLPipeline` between the text encoding and
    /// the decode.
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        job: &SampleJob,
        mut scheduler: Scheduler,
        unet: &UNet,
        context: Tensor<3>,
        added: Option<Tensor<2>>,
        noise: Tensor<4>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor<4>, SampleError> {
        let guided = job.cfg_scale > 1.0;
        let shape = noise.dims();
        let mut latents = noise.mul_scalar(scheduler.init_noise_sigma());
        let mut noise_rng = ChaCha8Rng::seed_from_u64(job.seed);
        noise_rng.set_stream(ANCESTRAL_STREAM);
        let batch = if guided { 2 } else { 1 };
        for i in 0..job.steps {
            let input = scheduler.scale_model_input(latents.clone(), i)?;
            let t = scheduler.timesteps()[i];
            let input = if guided {
                Tensor::cat(vec![input.clone(), input], 0)
            } else {
                input
            };
            let timestep =
                Tensor::<1>::from_data(TensorData::new(vec![t; batch], [batch]), &self.device);
            let prediction = unet.forward(input, timestep, context.clone(), added.clone());
            let prediction = if guided {
                let mut halves = prediction.chunk(2, 0);
                let (Some(cond), Some(uncond)) = (halves.pop(), halves.pop()) else {
                    return Err(SampleError::Readback(
                        "the guided batch did not split in two".into(),
                    ));
                };
                classifier_free_guidance(uncond, cond, job.cfg_scale)
            } else {
                prediction
            };
            let step_noise = job
                .sampler
                .is_ancestral()
                .then(|| standard_normal(&mut noise_rng, shape, &self.device));
            latents = scheduler.step(i, prediction, latents, step_noise)?;
            progress(i + 1, job.steps);
        }
        Ok(latents)
    }

    /// The UNet with every LoRA added at its weight; weight 0 adds nothing and is skipped.
    fn adapted_unet(
        &self,
        loras: &[(&slider_lora::Lora, f64)],
    ) -> Result<Cow<'_, UNet>, SampleError> {
        let mut unet = Cow::Borrowed(&self.model.unet);
        for &(lora, weight) in loras {
            if weight == 0.0 {
                continue;
            }
            let network = LoraNetwork::from_lora(lora, &self.model.unet, &self.device)?;
            unet = Cow::Owned(network.apply(&unet, weight)?);
        }
        Ok(unet)
    }

    /// A prompt's conditioning, computed once per prompt: SD1 takes CLIP-L's last layer after
    /// the final norm; SDXL the penultimate layers of CLIP-L (end-token padding) and bigG
    /// (zero padding) concatenated, plus bigG's pooled embedding.
    fn encode(&self, prompt: &str) -> Result<Conditioning, SampleError> {
        if let Some(hit) = self.cache().get(prompt) {
            return Ok(hit.clone());
        }
        self.model.spec.check_tokenizer_fits()?;
        let ids = |padding| {
            let ids: Vec<i64> = self
                .tokenizer
                .tokenize(prompt, padding)
                .into_iter()
                .map(i64::from)
                .collect();
            let n = ids.len();
            Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &self.device)
        };
        let l = self.text_l()?.forward(ids(Padding::EndToken));
        let conditioning = match (self.model.spec.family, &self.model.text_g) {
            (Family::Sdxl, Some(text_g)) => {
                let g = text_g.forward(ids(Padding::Zero));
                Conditioning {
                    context: Tensor::cat(vec![l.penultimate, g.penultimate], 2),
                    pooled: Some(g.pooled),
                }
            }
            (Family::Sdxl, None) => {
                return Err(SampleError::MissingPart("OpenCLIP bigG text encoder"));
            }
            (Family::Sd1, _) => Conditioning {
                context: l.last,
                pooled: None,
            },
        };
        self.cache().insert(prompt.to_owned(), conditioning.clone());
        Ok(conditioning)
    }

    /// The unconditional half of guidance. An empty negative prompt is the encoded empty
    /// string for SD1 and zeros for SDXL, as diffusers' pipelines do
    /// (`force_zeros_for_empty_prompt` of the SDXL base model's config).
    fn negative(
        &self,
        job: &SampleJob,
        positive: &Conditioning,
    ) -> Result<Conditioning, SampleError> {
        if job.negative_prompt.is_empty() && self.model.spec.family == Family::Sdxl {
            return Ok(positive.zeros_like());
        }
        self.encode(&job.negative_prompt)
    }

    /// SDXL's added conditioning for `pooled` `[b, d]`: the size ids of diffusers' pipeline,
    /// original size = target size = the image's (height, width), crop (0, 0).
    fn added_conditioning(&self, unet: &UNet, pooled: Tensor<2>, job: &SampleJob) -> Tensor<2> {
        let batch = pooled.dims()[0];
        let (h, w) = (job.height as f32, job.width as f32);
        let ids: Vec<f32> = (0..batch).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
        let time_ids = Tensor::<2>::from_data(TensorData::new(ids, [batch, 6]), &self.device);
        unet.added_conditioning(pooled, time_ids)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conditioning>> {
        // A panic while holding the lock cannot leave a half-written entry: inserts are whole.
        self.encoded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn text_l(&self) -> Result<&ClipTextModel, SampleError> {
        self.model
            .text_l
            .as_ref()
            .ok_or(SampleError::MissingPart("CLIP-L text encoder"))
    }

    fn vae(&self) -> Result<&Vae, SampleError> {
        self.model
            .vae
            .as_ref()
            .ok_or(SampleError::MissingPart("VAE"))
    }

    /// `vae.decode(latents / scaling_factor)`, then `(x / 2 + 0.5).clamp(0, 1) * 255`, rounded.
    fn decode(&self, latents: Tensor<4>) -> Result<image::RgbImage, SampleError> {
        let scaling = self.model.spec.family.scaling_factor();
        let pixels = self.vae()?.decode(latents.div_scalar(scaling));
        let [_, channels, h, w] = pixels.dims();
        if channels != 3 {
            return Err(SampleError::Readback(format!(
                "the VAE decoded {channels} channels, not 3"
            )));
        }
        let values = pixels
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| SampleError::Readback(format!("{e:?}")))?;
        let to_u8 = |v: f32| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
        let plane = h * w;
        Ok(image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let i = y as usize * w + x as usize;
            image::Rgb([
                to_u8(values[i]),
                to_u8(values[plane + i]),
                to_u8(values[2 * plane + i]),
            ])
        }))
    }
}

/// Classifier-free guidance as diffusers combines the two halves:
/// `uncond + scale * (cond - uncond)`.
pub fn classifier_free_guidance(uncond: Tensor<4>, cond: Tensor<4>, scale: f64) -> Tensor<4> {
    uncond.clone() + (cond - uncond).mul_scalar(scale)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
    use crate::sample::SamplerKind;
    use crate::sample::test_support::{random_lora, small_generator};

    pub(crate) fn job(sampler: SamplerKind) -> SampleJob {
        SampleJob {
            prompt: "a face with big eyes".into(),
            negative_prompt: "blurry".into(),
            seed: 7,
            steps: 3,
            cfg_scale: 5.0,
            sampler,
            width: 32,
            height: 24,
        }
    }

    #[test]
    fn guidance_moves_from_the_negative_towards_the_positive_prediction() {
        let device = Device::flex();
        let t = |v: [f32; 2]| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 1, 1, 2]), &device)
        };
        // (uncond, cond, scale) -> uncond + scale * (cond - uncond)
        let cases = [
            ([0.0, 1.0], [1.0, 1.0], 1.0, [1.0, 1.0]),
            ([0.0, 1.0], [1.0, 1.0], 7.5, [7.5, 1.0]),
            ([2.0, -1.0], [1.0, 0.0], 0.0, [2.0, -1.0]),
            ([2.0, -1.0], [1.0, 0.0], 3.0, [-1.0, 2.0]),
        ];
        for (uncond, cond, scale, want) in cases {
            let got = classifier_free_guidance(t(uncond), t(cond), scale)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            assert_eq!(got, want, "{uncond:?} {cond:?} x{scale}");
        }
    }

    #[test]
    fn images_are_reproducible_and_depend_on_seed_sampler_and_lora_weight() {
        let dir = tempfile::tempdir().unwrap();
        let g = small_generator(dir.path());
        assert_eq!(g.pixel_multiple(), 8);
        let lora = random_lora(&g, 11);
        let base = g.generate(&job(SamplerKind::EulerAncestral), &[]).unwrap();
        assert_eq!(base.dimensions(), (32, 24));
        let cases: [(&str, SampleJob, f64, bool); 6] = [
            ("same settings", job(SamplerKind::EulerAncestral), 0.0, true),
            (
                "weight 0 is the base model",
                job(SamplerKind::EulerAncestral),
                0.0,
                true,
            ),
            (
                "another seed",
                SampleJob {
                    seed: 8,
                    ..job(SamplerKind::EulerAncestral)
                },
                0.0,
                false,
            ),
            ("another sampler", job(SamplerKind::Euler), 0.0, false),
            ("LoRA at +1", job(SamplerKind::EulerAncestral), 1.0, false),
            ("LoRA at -1", job(SamplerKind::EulerAncestral), -1.0, false),
        ];
        for (label, job, weight, same) in cases {
            let loras = if label == "same settings" {
                vec![]
            } else {
                vec![(&lora, weight)]
            };
            let image = g.generate(&job, &loras).unwrap();
            assert_eq!(image == base, same, "{label}");
        }
        let plus = g
            .generate(&job(SamplerKind::EulerAncestral), &[(&lora, 1.0)])
            .unwrap();
        let minus = g
            .generate(&job(SamplerKind::EulerAncestral), &[(&lora, -1.0)])
            .unwrap();
        assert_ne!(plus, minus);
    }

    #[test]
    fn every_sampler_reports_each_step_and_guidance_off_skips_the_negative_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let g = small_generator(dir.path());
        for sampler in SamplerKind::ALL {
            let mut seen = Vec::new();
            g.generate_with_progress(&job(sampler), &[], |step, total| seen.push((step, total)))
                .unwrap();
            assert_eq!(seen, [(1, 3), (2, 3), (3, 3)], "{sampler}");
        }
        // At cfg 1 the negative prompt has no effect (it is not evaluated).
        let unguided = |negative: &str| {
            let job = SampleJob {
                cfg_scale: 1.0,
                negative_prompt: negative.into(),
                ..job(SamplerKind::Ddim)
            };
            g.generate(&job, &[]).unwrap()
        };
        assert_eq!(unguided("blurry"), unguided("something else"));
    }

    #[test]
    fn sizes_the_model_cannot_process_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let g = small_generator(dir.path());
        for (width, height) in [(30, 32), (32, 20), (0, 32), (32, 0)] {
            let job = SampleJob {
                width,
                height,
                ..job(SamplerKind::Euler)
            };
            let err = g.generate(&job, &[]).unwrap_err();
            assert!(
                matches!(err, SampleError::Size { multiple: 8, .. }),
                "{width}x{height}: {err}"
            );
            assert!(err.to_string().contains("multiples of 8"), "{err}");
        }
        let err = g
            .generate(
                &SampleJob {
                    steps: 0,
                    ..job(SamplerKind::Euler)
                },
                &[],
            )
            .unwrap_err();
        assert!(matches!(err, SampleError::Schedule(_)), "{err}");
    }

    /// Benchmark, not a check: seconds per 64x64 image at 20 steps with the `tiny`
    /// configuration (tiny UNet and VAE, full-size CLIP-L), random f16 weights, per sampler,
    /// guided (CFG 7, batch of 2) and unguided (CFG 1), median of 3 after a warm-up image.
    /// `cargo test -p slider-worker --lib sample::generator::tests::sampling_speed_of_the_tiny_config -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: about a minute"]
    fn sampling_speed_of_the_tiny_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.safetensors");
        write_random_checkpoint(&path, &ModelSpec::tiny(), StoreDtype::F16, 1).unwrap();
        let started = std::time::Instant::now();
        let g = Generator::load(&path, &Device::flex()).unwrap();
        eprintln!("load: {:.2} s", started.elapsed().as_secs_f64());
        // Where an image's time goes: one prompt through CLIP-L, one guided UNet call (batch
        // of 2 at 32x32 latents), one VAE decode (median of 5 each).
        let median = |f: &dyn Fn()| {
            let mut runs: Vec<f64> = (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            runs.sort_by(f64::total_cmp);
            runs[2]
        };
        let device = Device::flex();
        let text = median(&|| {
            g.cache().clear();
            g.encode("a face").unwrap();
        });
        let context = Tensor::cat(
            vec![
                g.encode("").unwrap().context,
                g.encode("a face").unwrap().context,
            ],
            0,
        );
        let latents = Tensor::<4>::zeros([2, 4, 32, 32], &device);
        let t = Tensor::<1>::from_data(TensorData::new(vec![500.0f32; 2], [2]), &device);
        let unet = median(&|| {
            let out = g
                .model
                .unet
                .forward(latents.clone(), t.clone(), context.clone(), None);
            out.into_data();
        });
        let decode = median(&|| {
            g.decode(Tensor::<4>::zeros([1, 4, 32, 32], &device))
                .unwrap();
        });
        eprintln!(
            "CLIP-L one prompt {text:.3} s, UNet batch 2 {unet:.3} s, VAE decode {decode:.3} s"
        );
        let time = |job: &SampleJob| {
            let t = std::time::Instant::now();
            g.generate(job, &[]).unwrap();
            t.elapsed().as_secs_f64()
        };
        eprintln!("| sampler | CFG | s / image (64x64, 20 steps) | runs |");
        eprintln!("|---|---|---|---|");
        let only = std::env::var("SAMPLERS").unwrap_or_default();
        for sampler in SamplerKind::ALL {
            if !only.is_empty() && !only.split(',').any(|s| s == sampler.recipe_name()) {
                continue;
            }
            for cfg_scale in [7.0, 1.0] {
                let job = SampleJob {
                    steps: 20,
                    cfg_scale,
                    width: 64,
                    height: 64,
                    ..job(sampler)
                };
                time(&job);
                let mut runs: Vec<f64> = (0..3).map(|_| time(&job)).collect();
                runs.sort_by(f64::total_cmp);
                let list: Vec<String> = runs.iter().map(|r| format!("{r:.2}")).collect();
                eprintln!(
                    "| {sampler} | {cfg_scale} | {:.2} | {} |",
                    runs[1],
                    list.join(", ")
                );
            }
        }
    }

    type Fixture = BTreeMap<String, (Vec<f32>, Vec<usize>)>;

    /// A fixture of `tests/fixtures/sampler/` (make_sampler_fixtures.py).
    fn pipeline_fixture(name: &str) -> Fixture {
        let path = format!("{FIXTURES}sampler/{name}");
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        file.tensors()
            .into_iter()
            .map(|(k, v)| {
                let values = v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (k, (values, v.shape().to_vec()))
            })
            .collect()
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/");

    fn up<const D: usize>(fx: &Fixture, name: &str) -> Tensor<D> {
        let (values, shape) = &fx[name];
        let shape: [usize; D] = shape.clone().try_into().unwrap();
        Tensor::from_data(TensorData::new(values.clone(), shape), &Device::flex())
    }

    fn rel_error(got: &[f32], want: &[f32]) -> f64 {
        let (diff, norm) = got
            .iter()
            .zip(want)
            .fold((0.0f64, 0.0f64), |(d, n), (&a, &b)| {
                let (a, b) = (f64::from(a), f64::from(b));
                (d + (a - b) * (a - b), n + b * b)
            });
        (diff / norm).sqrt()
    }

    /// `[negative; positive]` when guided, else the positive alone.
    fn halves<const D: usize>(fx: &Fixture, name: &str, guided: bool) -> Tensor<D> {
        let positive = up(fx, name);
        if guided {
            Tensor::cat(vec![up(fx, &format!("negative_{name}")), positive], 0)
        } else {
            positive
        }
    }

    /// The loop and the decode against diffusers' `StableDiffusionPipeline` on the tiny SD1
    /// fixture model, given the same text conditioning and initial noise.
    #[test]
    fn generation_equals_the_diffusers_pipeline() {
        let fx = pipeline_fixture("pipeline.safetensors");
        let device = Device::flex();
        let g = Generator::load(
            Path::new(&format!("{FIXTURES}sd1_tiny.safetensors")),
            &device,
        )
        .unwrap();
        assert_eq!(g.pixel_multiple(), 4);
        let cases = [
            (SamplerKind::Euler, 5, 7.5),
            (SamplerKind::Ddim, 5, 7.5),
            (SamplerKind::DpmPp2mKarras, 5, 7.5),
            (SamplerKind::Ddim, 4, 1.0),
        ];
        for (sampler, steps, cfg_scale) in cases {
            let case = format!("{sampler}.{steps}.cfg{cfg_scale:?}");
            let job = SampleJob {
                steps,
                cfg_scale,
                width: 32,
                height: 32,
                ..job(sampler)
            };
            let context = halves(&fx, "prompt_embeds", cfg_scale > 1.0);
            let scheduler = Scheduler::new(sampler, steps).unwrap();
            let latents = g
                .denoise(
                    &job,
                    scheduler,
                    &g.model.unet,
                    context,
                    None,
                    up(&fx, "noise"),
                    &mut |_, _| {},
                )
                .unwrap();
            let got = latents.clone().into_data().try_to_vec::<f32>().unwrap();
            let err = rel_error(&got, &fx[&format!("{case}.latents")].0);
            eprintln!("{case}: latents relative error {err:e}");
            assert!(err < 1e-4, "{case}: latents {err:e}");
            // Pixels: ours are u8; the reference's [0, 1] floats, rounded as diffusers'
            // `numpy_to_pil` rounds them, may differ by one step where they sit on a boundary.
            let image = g.decode(latents).unwrap();
            let want = &fx[&format!("{case}.image")].0;
            let worst = image
                .as_raw()
                .iter()
                .zip(want)
                .map(|(&p, &w)| (f32::from(p) - (w * 255.0).round()).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1.0, "{case}: a pixel differs by {worst}");
        }
    }

    /// SDXL's conditioning (context, pooled text, size ids, both halves) in the loop against
    /// diffusers' `StableDiffusionXLPipeline` on the tiny SDXL fixture UNet (the file has no
    /// VAE, so latents only; the generator is built around the model directly).
    #[test]
    fn sdxl_generation_equals_the_diffusers_pipeline() {
        let fx = pipeline_fixture("pipeline_sdxl.safetensors");
        let device = Device::flex();
        let ckpt = Checkpoint::open(format!("{FIXTURES}sdxl_tiny.safetensors")).unwrap();
        let g = Generator {
            model: StableDiffusion::load(&ckpt, &device).unwrap(),
            tokenizer: Tokenizer::clip().unwrap(),
            device: device.clone(),
            encoded: Mutex::new(HashMap::new()),
        };
        assert!(matches!(
            Generator::from_model(StableDiffusion::load(&ckpt, &device).unwrap(), &device),
            Err(SampleError::MissingPart("VAE"))
        ));
        for (sampler, steps, cfg_scale) in [
            (SamplerKind::Euler, 4, 6.0),
            (SamplerKind::DpmPp2mKarras, 4, 1.0),
        ] {
            let case = format!("{sampler}.{steps}.cfg{cfg_scale:?}");
            let job = SampleJob {
                steps,
                cfg_scale,
                width: 48,
                height: 32,
                ..job(sampler)
            };
            let guided = cfg_scale > 1.0;
            let context = halves(&fx, "prompt_embeds", guided);
            let pooled = halves(&fx, "pooled_prompt_embeds", guided);
            let added = g.added_conditioning(&g.model.unet, pooled, &job);
            let scheduler = Scheduler::new(sampler, steps).unwrap();
            let latents = g
                .denoise(
                    &job,
                    scheduler,
                    &g.model.unet,
                    context,
                    Some(added),
                    up(&fx, "noise"),
                    &mut |_, _| {},
                )
                .unwrap();
            let got = latents.into_data().try_to_vec::<f32>().unwrap();
            let err = rel_error(&got, &fx[&format!("{case}.latents")].0);
            eprintln!("SDXL {case}: latents relative error {err:e}");
            assert!(err < 1e-4, "{case}: latents {err:e}");
        }
    }

    #[test]
    fn models_without_a_part_sampling_needs_are_refused() {
        let device = Device::flex();
        type Edit = fn(&mut StableDiffusion);
        let cases: [(&str, Edit, &str); 3] = [
            ("no VAE", |m| m.vae = None, "VAE"),
            ("no CLIP-L", |m| m.text_l = None, "CLIP-L text encoder"),
            (
                "SDXL without bigG",
                |m| m.spec.family = Family::Sdxl,
                "OpenCLIP bigG text encoder",
            ),
        ];
        for (label, edit, part) in cases {
            let spec = ModelSpec::small_test();
            let mut model = StableDiffusion {
                unet: spec.unet.init(&device),
                vae: spec.vae.as_ref().map(|c| c.init(&device)),
                text_l: spec.text_l.as_ref().map(|c| c.init_hf(&device)),
                text_g: None,
                spec,
            };
            edit(&mut model);
            let err = Generator::from_model(model, &device).unwrap_err();
            assert!(
                matches!(err, SampleError::MissingPart(p) if p == part),
                "{label}: {err}"
            );
        }
    }
}

//! The eye meter: a small CNN that reads the eye size (the toy world's `eye_size`, 0 small to
//! 1 big) and the eye boxes off a picture of a toy-world head, so the slider's effect on
//! generated images can be measured instead of judged by eye. It is trained on rendered toy
//! images with augmentations that mimic generated ones ([`train`]), and shipped as a
//! safetensors file under 1 MB (`assets/eye-meter/eye-meter.safetensors`).
//!
//! ```no_run
//! use slider_evaluate::eye_meter::EyeMeter;
//! use slider_models::open_device;
//!
//! let device = open_device("cpu")?;
//! let meter = EyeMeter::load("assets/eye-meter/eye-meter.safetensors".as_ref(), &device)?;
//! let image = image::open("generated.png")?.to_rgb8();
//! let reading = meter.measure(&image)?;
//! println!("eye size {:.2}, {} eye(s) found", reading.eye_size, reading.eye_boxes.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod augment;
mod net;
mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use safetensors::tensor::Dtype;

pub use net::{INPUT_SIZE, OUTPUTS};
pub use train::{
    EyeMeterTrainConfig, TrainProgress, TrainReport, ViewAccuracy, evaluate, train_eye_meter,
};

use net::Net;

/// Metadata key naming the file format.
const KEY_FORMAT: &str = "format";
const FORMAT: &str = "slider-eye-meter/1";

/// What the meter reads off one image.
#[derive(Debug, Clone, PartialEq)]
pub struct EyeReading {
    /// The toy world's eye size: about 0 for the smallest eyes, 1 for the biggest; not clamped,
    /// so eyes beyond the trained range read beyond `[0, 1]`.
    pub eye_size: f32,
    /// Boxes of the eyes found, left to right, `[x0, y0, x1, y1]` in the input's pixels.
    pub eye_boxes: Vec<[f32; 4]>,
}

/// Why the meter cannot be loaded, saved or run.
#[derive(Debug, thiserror::Error)]
pub enum EyeMeterError {
    #[error("cannot read the eye meter {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the eye meter {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an eye meter: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("the image is empty ({width}x{height})")]
    EmptyImage { width: u32, height: u32 },
    #[error("the network produced no readable output: {0}")]
    Output(String),
    #[error("training diverged at step {step} (loss {loss})")]
    Diverged { step: usize, loss: f32 },
    #[error(transparent)]
    Optimizer(#[from] slider_optim::OptimizerError),
    #[error("invalid training configuration: {0}")]
    Config(String),
}

/// A trained eye meter on a device.
#[derive(Debug, Clone)]
pub struct EyeMeter {
    net: Net,
    metadata: HashMap<String, String>,
}

impl EyeMeter {
    /// Loads a meter written by [`EyeMeter::save`] onto `device`. Every tensor's name and shape
    /// is checked against the architecture.
    pub fn load(path: &Path, device: &Device) -> Result<EyeMeter, EyeMeterError> {
        let bytes = std::fs::read(path).map_err(|source| EyeMeterError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        EyeMeter::from_bytes(&bytes, device).map_err(|reason| EyeMeterError::Format {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn from_bytes(bytes: &[u8], device: &Device) -> Result<EyeMeter, String> {
        let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let metadata = header.metadata().clone().unwrap_or_default();
        if metadata.get(KEY_FORMAT).map(String::as_str) != Some(FORMAT) {
            return Err(format!("metadata `{KEY_FORMAT}` is not `{FORMAT}`"));
        }
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(format!("tensor `{name}` is {:?}, not F32", view.dtype()));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        let net = Net::from_host(tensors, device)?;
        Ok(EyeMeter { net, metadata })
    }

    /// Writes the meter as safetensors (f32 weights; `extra` joins the metadata), atomically.
    pub fn save(&self, path: &Path, extra: &[(String, String)]) -> Result<(), EyeMeterError> {
        let mut metadata = self.metadata.clone();
        metadata.insert(KEY_FORMAT.into(), FORMAT.into());
        metadata.insert("input_size".into(), INPUT_SIZE.to_string());
        metadata.insert(
            "outputs".into(),
            "eye_size,present_0,x0_0,y0_0,x1_0,y1_0,present_1,x0_1,y0_1,x1_1,y1_1".into(),
        );
        for (k, v) in extra {
            metadata.insert(k.clone(), v.clone());
        }
        let bytes = safetensors_bytes(&self.net.to_host(), &metadata).map_err(|reason| {
            EyeMeterError::Format {
                path: path.to_path_buf(),
                reason,
            }
        })?;
        slider_atomic::write(path, &bytes).map_err(|source| EyeMeterError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The file's metadata (training seed, steps, held-out accuracy, ...).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Reads the eye size and eye boxes off `image` (any size; resized to
    /// [`INPUT_SIZE`] square first).
    pub fn measure(&self, image: &RgbImage) -> Result<EyeReading, EyeMeterError> {
        let mut readings = self.measure_batch(std::slice::from_ref(image))?;
        readings
            .pop()
            .ok_or_else(|| EyeMeterError::Output("no reading for the image".into()))
    }

    /// [`EyeMeter::measure`] for many images at once (one forward pass per 64 images).
    pub fn measure_batch(&self, images: &[RgbImage]) -> Result<Vec<EyeReading>, EyeMeterError> {
        let mut readings = Vec::with_capacity(images.len());
        for chunk in images.chunks(64) {
            let mut pixels = Vec::with_capacity(chunk.len() * 3 * INPUT_SIZE * INPUT_SIZE);
            for image in chunk {
                if image.width() == 0 || image.height() == 0 {
                    return Err(EyeMeterError::EmptyImage {
                        width: image.width(),
                        height: image.height(),
                    });
                }
                push_input(image, &mut pixels);
            }
            let input = Tensor::<4>::from_data(
                TensorData::new(pixels, [chunk.len(), 3, INPUT_SIZE, INPUT_SIZE]),
                &self.net.device(),
            );
            let out = self
                .net
                .forward(input)
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| EyeMeterError::Output(format!("{e:?}")))?;
            for (image, row) in chunk.iter().zip(out.chunks_exact(OUTPUTS)) {
                readings.push(decode(row, image.width(), image.height()));
            }
        }
        Ok(readings)
    }

    pub(crate) fn from_net(net: Net, metadata: HashMap<String, String>) -> EyeMeter {
        EyeMeter { net, metadata }
    }
}

/// The safetensors encoding of f32 `tensors` (in the given order) with `metadata`, keys
/// sorted, so the same weights always give the same bytes (the `safetensors` crate writes
/// metadata in a `HashMap`'s order, which changes from run to run).
fn safetensors_bytes(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    let mut header = serde_json::Map::new();
    let sorted: std::collections::BTreeMap<&String, &String> = metadata.iter().collect();
    header.insert("__metadata__".into(), serde_json::json!(sorted));
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        if shape.iter().product::<usize>() != values.len() {
            return Err(format!(
                "tensor `{name}`: shape {shape:?} does not match its values"
            ));
        }
        let end = offset + 4 * values.len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_string(&header).map_err(|e| e.to_string())?;
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + offset);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    for (_, _, values) in tensors {
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(bytes)
}

/// Appends `image` as network input: resized to [`INPUT_SIZE`] square (triangle filter),
/// channels first, values in `[-1, 1]`.
fn push_input(image: &RgbImage, out: &mut Vec<f32>) {
    let size = INPUT_SIZE as u32;
    let resized;
    let image = if image.width() == size && image.height() == size {
        image
    } else {
        resized = image::imageops::resize(image, size, size, image::imageops::FilterType::Triangle);
        &resized
    };
    for c in 0..3 {
        out.extend(image.pixels().map(|p| p.0[c] as f32 / 127.5 - 1.0));
    }
}

/// One output row to a reading: boxes of the slots whose presence logit is positive, scaled
/// from unit coordinates to the input's pixels.
fn decode(row: &[f32], width: u32, height: u32) -> EyeReading {
    let (w, h) = (width as f32, height as f32);
    let eye_boxes = row[1..]
        .chunks_exact(5)
        .filter(|slot| slot[0] > 0.0)
        .map(|slot| [slot[1] * w, slot[2] * h, slot[3] * w, slot[4] * h])
        .collect();
    EyeReading {
        eye_size: row[0],
        eye_boxes,
    }
}

#[cfg(test)]
mod tests;

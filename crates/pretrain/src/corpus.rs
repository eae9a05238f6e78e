//! The pretraining corpus in kohya's dataset layout: a folder of `NAME.png` images, each with
//! its caption in `NAME.txt` (one line). Images are read once into one `[n, 3, s, s]` tensor in
//! [-1, 1]; the order is the sorted file names, so a corpus always loads the same way.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};

use super::PretrainError;

/// Images and captions, in file-name order.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// `[n, 3, size, size]` in [-1, 1].
    pub images: Tensor<4>,
    /// One caption per image.
    pub captions: Vec<String>,
    /// Side of the (square) images.
    pub size: usize,
}

impl Corpus {
    /// Reads every `NAME.png` with its `NAME.txt` from `dir`. All images must be square and of
    /// one size; an image without caption, or a caption without image, is an error.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, PretrainError> {
        let bad = |path: &Path, message: String| PretrainError::Corpus {
            path: path.to_path_buf(),
            message,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| bad(dir, e.to_string()))?;
        let mut pngs: Vec<PathBuf> = Vec::new();
        let mut txts: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| bad(dir, e.to_string()))?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("png") => pngs.push(path),
                Some("txt") => txts.push(path),
                _ => {}
            }
        }
        pngs.sort();
        if pngs.is_empty() {
            return Err(bad(dir, "no .png images".into()));
        }
        for txt in &txts {
            if !txt.with_extension("png").is_file() {
                return Err(bad(txt, "caption without an image".into()));
            }
        }
        let mut size = 0usize;
        let mut values: Vec<f32> = Vec::new();
        let mut captions = Vec::with_capacity(pngs.len());
        for png in &pngs {
            let image = image::open(png)
                .map_err(|e| bad(png, e.to_string()))?
                .to_rgb8();
            let (w, h) = image.dimensions();
            if w != h {
                return Err(bad(png, format!("{w}x{h} is not square")));
            }
            if size == 0 {
                size = w as usize;
                values.reserve(pngs.len() * 3 * size * size);
            } else if w as usize != size {
                return Err(bad(png, format!("{w}x{h}; the corpus is {size}x{size}")));
            }
            push_chw(&image, &mut values);
            let txt = png.with_extension("txt");
            let caption =
                std::fs::read_to_string(&txt).map_err(|e| bad(&txt, format!("caption: {e}")))?;
            captions.push(caption.lines().next().unwrap_or("").trim().to_string());
        }
        let n = pngs.len();
        let images = Tensor::from_data(TensorData::new(values, [n, 3, size, size]), device);
        Ok(Self {
            images,
            captions,
            size,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    /// True when there are no images (never, for a loaded corpus).
    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }
}

/// Appends an RGB image as channel-major values in [-1, 1].
pub fn push_chw(image: &image::RgbImage, out: &mut Vec<f32>) {
    for c in 0..3 {
        out.extend(image.pixels().map(|p| f32::from(p[c]) / 127.5 - 1.0));
    }
}

/// `[3, h, w]` values in [-1, 1] (clamped) to an RGB image.
pub fn to_rgb(values: &[f32], height: usize, width: usize) -> image::RgbImage {
    let plane = height * width;
    image::RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let i = y as usize * width + x as usize;
        let px = |c: usize| {
            let v = values.get(c * plane + i).copied().unwrap_or(0.0);
            ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
        };
        image::Rgb([px(0), px(1), px(2)])
    })
}

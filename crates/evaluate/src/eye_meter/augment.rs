//! Augmentations that make crisp renders look like a tiny diffusion model's output: a small
//! shift and scale (boxes moved along), Gaussian blur, colour jitter (gain, offset, contrast)
//! and pixel noise. All randomness comes from the caller's ChaCha stream.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// An image as `height x width x 3` floats in `[0, 1]`, row-major.
#[derive(Debug, Clone)]
pub(crate) struct FloatImage {
    pub(crate) size: usize,
    pub(crate) data: Vec<f32>,
}

impl FloatImage {
    pub(crate) fn from_rgb(image: &image::RgbImage) -> FloatImage {
        FloatImage {
            size: image.width() as usize,
            data: image.as_raw().iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }

    /// Channels first, values in `[-1, 1]` (the network's input).
    pub(crate) fn push_chw(&self, out: &mut Vec<f32>) {
        for c in 0..3 {
            out.extend(self.data.chunks_exact(3).map(|p| p[c] * 2.0 - 1.0));
        }
    }

    fn at(&self, x: isize, y: isize, c: usize) -> f32 {
        let max = self.size as isize - 1;
        let (x, y) = (x.clamp(0, max) as usize, y.clamp(0, max) as usize);
        self.data[(y * self.size + x) * 3 + c]
    }
}

/// Applies every augmentation in turn; `boxes` (pixels) follow the geometric ones.
pub(crate) fn augment(image: &mut FloatImage, boxes: &mut [[f32; 4]], rng: &mut ChaCha8Rng) {
    let scale = rng.random_range(0.92..1.08);
    let shift = [rng.random_range(-3.0..3.0), rng.random_range(-3.0..3.0)];
    affine(image, boxes, scale, shift);
    if rng.random_bool(0.75) {
        blur(image, rng.random_range(0.3..1.3));
    }
    jitter(image, rng);
    let sigma = rng.random_range(0.0..0.05);
    for v in &mut image.data {
        *v = (*v + sigma * rng.sample::<f32, _>(StandardNormal)).clamp(0.0, 1.0);
    }
}

/// Scales about the centre by `scale`, then shifts by `shift` pixels (bilinear, edges
/// extended).
fn affine(image: &mut FloatImage, boxes: &mut [[f32; 4]], scale: f32, shift: [f32; 2]) {
    let n = image.size;
    let centre = n as f32 / 2.0;
    let mut out = vec![0.0; image.data.len()];
    for y in 0..n {
        for x in 0..n {
            let sx = (x as f32 + 0.5 - centre - shift[0]) / scale + centre - 0.5;
            let sy = (y as f32 + 0.5 - centre - shift[1]) / scale + centre - 0.5;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            for c in 0..3 {
                let top = image.at(x0, y0, c) * (1.0 - fx) + image.at(x0 + 1, y0, c) * fx;
                let bottom =
                    image.at(x0, y0 + 1, c) * (1.0 - fx) + image.at(x0 + 1, y0 + 1, c) * fx;
                out[(y * n + x) * 3 + c] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    image.data = out;
    for b in boxes.iter_mut() {
        for (i, v) in b.iter_mut().enumerate() {
            *v = (*v - centre) * scale + centre + shift[i % 2];
        }
    }
}

/// Separable Gaussian blur of standard deviation `sigma` pixels.
fn blur(image: &mut FloatImage, sigma: f32) {
    let radius = (2.5 * sigma).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let n = image.size;
    for horizontal in [true, false] {
        let mut out = vec![0.0; image.data.len()];
        for y in 0..n {
            for x in 0..n {
                for c in 0..3 {
                    let mut acc = 0.0;
                    for (k, w) in kernel.iter().enumerate() {
                        let d = k as isize - radius;
                        let (sx, sy) = if horizontal {
                            (x as isize + d, y as isize)
                        } else {
                            (x as isize, y as isize + d)
                        };
                        acc += w * image.at(sx, sy, c);
                    }
                    out[(y * n + x) * 3 + c] = acc;
                }
            }
        }
        image.data = out;
    }
}

/// Per-channel gain, a global offset, and contrast about the image mean.
fn jitter(image: &mut FloatImage, rng: &mut ChaCha8Rng) {
    let gain: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.9..1.1));
    let offset = rng.random_range(-0.06..0.06);
    let contrast = rng.random_range(0.8..1.2);
    let mean = image.data.iter().sum::<f32>() / image.data.len() as f32;
    for (i, v) in image.data.iter_mut().enumerate() {
        let c = ((*v - mean) * contrast + mean) * gain[i % 3] + offset;
        *v = c.clamp(0.0, 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn affine_moves_boxes_with_the_content() {
        // A white square on black moves and grows exactly as its box says.
        let n = 32;
        let mut data = vec![0.0; n * n * 3];
        for y in 10..16 {
            for x in 8..14 {
                for c in 0..3 {
                    data[(y * n + x) * 3 + c] = 1.0;
                }
            }
        }
        let mut image = FloatImage { size: n, data };
        let mut boxes = [[8.0, 10.0, 14.0, 16.0]];
        affine(&mut image, &mut boxes, 1.0, [3.0, -2.0]);
        assert_eq!(boxes[0], [11.0, 8.0, 17.0, 14.0]);
        assert_eq!(image.at(11, 8, 0), 1.0);
        assert_eq!(image.at(16, 13, 1), 1.0);
        assert_eq!(image.at(10, 8, 0), 0.0);
        assert_eq!(image.at(17, 13, 0), 0.0);
    }

    #[test]
    fn blur_and_jitter_keep_values_in_range_and_blur_keeps_the_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let data: Vec<f32> = (0..16 * 16 * 3)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let mut image = FloatImage { size: 16, data };
        let before = image.data.iter().sum::<f32>();
        blur(&mut image, 1.0);
        let after = image.data.iter().sum::<f32>();
        // Edge extension changes the mean only a little.
        assert!((before - after).abs() / before < 0.05, "{before} {after}");
        jitter(&mut image, &mut rng);
        assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

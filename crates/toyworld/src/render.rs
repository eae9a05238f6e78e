//! Drawing a character: flat-coloured shapes painted back to front (background, back hair,
//! shoulders, neck, head with hair, ears, brows, nose, mouth, eyes) in head coordinates,
//! anti-aliased by 4x4 supersampling. The head is treated as a turning ellipsoid: a feature at
//! angle `phi` on the face appears at `sin(phi + yaw)` of the head's half-width and is
//! foreshortened by `cos(phi + yaw)`, so the three views are one drawing seen from three sides.
//! The eyes are painted last and nothing else depends on `eye_size`, so the eye size changes no
//! pixel outside the eye boxes.

use std::f32::consts::FRAC_PI_4;
use std::fmt;
use std::str::FromStr;

use image::RgbImage;

use crate::identity::{HairStyle, Identity, Rgb};

/// Supersampling factor per axis.
const SUPERSAMPLE: u32 = 4;

/// Head centre and vertical radius in image units (the image is the unit square).
const HEAD_CX: f32 = 0.5;
const HEAD_CY: f32 = 0.42;
const HEAD_RY: f32 = 0.29;
/// Horizontal head radius of an average face, in image units.
const HEAD_RX: f32 = 0.245;

/// Eye centre height and angular offset from the face's midline, in head units / radians.
const EYE_V: f32 = 0.10;
const EYE_PHI: f32 = 0.5;
/// An eye is drawn only while it faces the camera at least this much (`cos` of its angle).
const EYE_MIN_COS: f32 = 0.2;

/// The camera's side of the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    Front,
    Deg45,
    Side,
}

impl View {
    /// Every view, in turning order.
    pub const ALL: [View; 3] = [View::Front, View::Deg45, View::Side];

    /// File-name spelling, as in the recipes: `front`, `45deg`, `side`.
    pub fn name(self) -> &'static str {
        match self {
            View::Front => "front",
            View::Deg45 => "45deg",
            View::Side => "side",
        }
    }

    /// How far the head is turned (towards the image's right), in radians.
    pub fn yaw(self) -> f32 {
        match self {
            View::Front => 0.0,
            View::Deg45 => FRAC_PI_4,
            View::Side => 2.0 * FRAC_PI_4,
        }
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A view name that is not `front`, `45deg` or `side`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown view `{0}`: expected front, 45deg or side")]
pub struct UnknownView(pub String);

impl FromStr for View {
    type Err = UnknownView;
    fn from_str(s: &str) -> Result<View, UnknownView> {
        match s {
            "front" => Ok(View::Front),
            "45deg" | "45" => Ok(View::Deg45),
            "side" => Ok(View::Side),
            other => Err(UnknownView(other.to_string())),
        }
    }
}

/// A rendered image and where its visible eyes are.
#[derive(Debug, Clone)]
pub struct Render {
    pub image: RgbImage,
    /// One box per visible eye (two at front and 45 degrees, one at the side), left to right,
    /// as `[x0, y0, x1, y1]` in pixels: the extent of the eye's outline.
    pub eye_boxes: Vec<[f32; 4]>,
}

/// Draws `identity` seen from `view` with eyes of `eye_size` (clamped to `[0, 1]`: 0 the
/// smallest, 1 the biggest) as a `size` x `size` image.
pub fn render(identity: &Identity, view: View, eye_size: f32, size: u32) -> Render {
    let scene = Scene::new(identity, view, eye_size);
    let mut image = RgbImage::new(size, size);
    let n = SUPERSAMPLE;
    let scale = 1.0 / size as f32;
    let weight = 1.0 / (n * n) as f32;
    for py in 0..size {
        for px in 0..size {
            let mut sum = [0.0f32; 3];
            for sy in 0..n {
                for sx in 0..n {
                    let x = (px as f32 + (sx as f32 + 0.5) / n as f32) * scale;
                    let y = (py as f32 + (sy as f32 + 0.5) / n as f32) * scale;
                    let c = scene.colour_at(x, y);
                    for k in 0..3 {
                        sum[k] += c[k];
                    }
                }
            }
            let rgb = sum.map(|s| (s * weight * 255.0).round().clamp(0.0, 255.0) as u8);
            image.put_pixel(px, py, image::Rgb(rgb));
        }
    }
    let eye_boxes = scene
        .eyes
        .iter()
        .map(|eye| eye.bounds(&scene).map(|b| b * size as f32))
        .collect();
    Render { image, eye_boxes }
}

/// One visible eye, in head units.
#[derive(Debug, Clone, Copy)]
struct Eye {
    u: f32,
    v: f32,
    half_w: f32,
    half_h: f32,
    /// Horizontal shift of the iris inside the eye (the gaze follows the turn), eye units.
    gaze: f32,
    /// Horizontal squeeze of the eye by the turn (1 facing the camera).
    foreshorten: f32,
}

impl Eye {
    /// `[x0, y0, x1, y1]` in image units.
    fn bounds(&self, s: &Scene) -> [f32; 4] {
        [
            s.cx + (self.u - self.half_w) * s.rx,
            s.cy + (self.v - self.half_h) * s.ry,
            s.cx + (self.u + self.half_w) * s.rx,
            s.cy + (self.v + self.half_h) * s.ry,
        ]
    }
}

struct Scene<'a> {
    id: &'a Identity,
    yaw: f32,
    sin: f32,
    cos: f32,
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    skin: Rgb,
    hair: Rgb,
    eyes: Vec<Eye>,
}

const WHITE: Rgb = [0.99, 0.99, 1.0];
const LASH: Rgb = [0.10, 0.07, 0.10];
const PUPIL: Rgb = [0.05, 0.04, 0.06];
const LIPS: Rgb = [0.72, 0.27, 0.30];

impl<'a> Scene<'a> {
    fn new(id: &'a Identity, view: View, eye_size: f32) -> Scene<'a> {
        let e = if eye_size.is_nan() {
            0.0
        } else {
            eye_size.clamp(0.0, 1.0)
        };
        let yaw = view.yaw();
        let (sin, cos) = yaw.sin_cos();
        let mut scene = Scene {
            id,
            yaw,
            sin,
            cos,
            cx: HEAD_CX,
            cy: HEAD_CY,
            rx: HEAD_RX * id.face_width * (1.0 + 0.12 * sin),
            ry: HEAD_RY,
            skin: id.skin.rgb(),
            hair: id.hair_colour.rgb(),
            eyes: Vec::new(),
        };
        for phi in [-EYE_PHI, EYE_PHI] {
            let a = phi + yaw;
            if a.cos() < EYE_MIN_COS {
                continue;
            }
            let foreshorten = a.cos().powf(0.4);
            scene.eyes.push(Eye {
                u: 0.92 * scene.half_width(EYE_V) * a.sin(),
                v: EYE_V,
                half_w: (0.13 + 0.09 * e) * foreshorten,
                half_h: 0.08 + 0.11 * e,
                gaze: 0.25 * sin,
                foreshorten,
            });
        }
        scene
            .eyes
            .sort_by(|a, b| a.u.partial_cmp(&b.u).unwrap_or(std::cmp::Ordering::Equal));
        scene
    }

    /// Half-width of the face ellipse at height `v` (head units), narrowed towards the chin.
    fn half_width(&self, v: f32) -> f32 {
        if v.abs() >= 1.0 {
            return 0.0;
        }
        let narrowing = if v > 0.0 {
            1.0 - self.id.jaw * v * v
        } else {
            1.0
        };
        narrowing * (1.0 - v * v).sqrt()
    }

    fn colour_at(&self, x: f32, y: f32) -> Rgb {
        let u = (x - self.cx) / self.rx;
        let v = (y - self.cy) / self.ry;
        let mut c = self.id.background.rgb();
        if self.in_back_hair(u, v) {
            c = self.hair;
        }
        if self.in_shoulders(x, y) {
            c = self.id.clothes.rgb();
        }
        if self.in_neck(u, y) {
            c = shade(self.skin, 0.86);
        }
        if let Some(head) = self.head_colour(u, v) {
            c = head;
        }
        if let Some(ear) = self.ear_colour(u, v) {
            c = ear;
        }
        if self.in_brow(u, v) {
            c = shade(self.hair, 0.6);
        }
        if let Some(nose) = self.nose_colour(u, v) {
            c = nose;
        }
        if in_ellipse(
            u,
            v,
            self.half_width(0.62) * self.sin * 0.93,
            0.62,
            0.10 * self.cos + 0.04,
            0.035,
        ) {
            c = LIPS;
        }
        for eye in &self.eyes {
            if let Some(e) = self.eye_colour(eye, u, v) {
                c = e;
            }
        }
        c
    }

    fn in_back_hair(&self, u: f32, v: f32) -> bool {
        let s = self.sin;
        match self.id.hair_style {
            HairStyle::Short => false,
            HairStyle::Long => in_ellipse(u, v, -0.45 * s, 0.62, 1.22 - 0.1 * s, 1.12),
            HairStyle::Bob => v < 0.72 && in_ellipse(u, v, -0.3 * s, -0.05, 1.17, 1.08),
            HairStyle::Ponytail => in_ellipse(
                u,
                v,
                -1.25 * s,
                -1.0 + 0.8 * s,
                0.32 + 0.03 * s,
                0.28 + 0.47 * s,
            ),
        }
    }

    fn in_shoulders(&self, x: f32, y: f32) -> bool {
        in_ellipse(
            x,
            y,
            0.5 - 0.03 * self.sin,
            1.04,
            0.40 * (1.0 - 0.3 * self.sin),
            0.25,
        )
    }

    fn in_neck(&self, u: f32, y: f32) -> bool {
        let s = self.sin;
        y > self.cy + 0.5 * self.ry && y < 0.86 && u > -0.32 - 0.15 * s && u < 0.32 - 0.1 * s
    }

    /// The head: skin where the face is, hair elsewhere (fringe, sides, back, volume on top).
    fn head_colour(&self, u: f32, v: f32) -> Option<Rgb> {
        let style = self.id.hair_style;
        let (face_half_angle, side_length) = match style {
            HairStyle::Short | HairStyle::Ponytail => (1.30, 0.05),
            HairStyle::Bob => (1.15, 0.72),
            HairStyle::Long => (1.2, 1.0),
        };
        let hw = self.half_width(v);
        if u.abs() <= hw {
            let phi = (u / hw).clamp(-1.0, 1.0).asin() - self.yaw;
            let fringe = -0.30 + 0.07 * (5.0 * phi).sin().abs();
            // The face is wider than a sphere's cap: turned away, more of the cheek stays visible.
            let face_half_angle = face_half_angle + 0.3 * self.sin;
            let hair = v < fringe || (phi.abs() > face_half_angle && v < side_length);
            return Some(if hair { self.hair } else { self.skin });
        }
        let back_of_head = self.sin > 0.0 && in_ellipse(u, v, -0.35 * self.sin, -0.12, 0.85, 0.82);
        let volume = v < 0.0 && in_ellipse(u, v, -0.1 * self.sin, -0.02, 1.08, 1.07);
        (back_of_head || volume).then_some(self.hair)
    }

    fn ear_colour(&self, u: f32, v: f32) -> Option<Rgb> {
        if self.id.hair_style.covers_ears() {
            return None;
        }
        for phi in [-2.0 * FRAC_PI_4, 2.0 * FRAC_PI_4] {
            let a = phi + self.yaw;
            if a.cos() < -0.05 {
                continue;
            }
            let centre = self.half_width(0.12) * a.sin();
            if in_ellipse(u, v, centre, 0.12, 0.07 + 0.07 * a.cos().max(0.0), 0.19) {
                return Some(shade(self.skin, 0.95));
            }
        }
        None
    }

    fn in_brow(&self, u: f32, v: f32) -> bool {
        self.eyes
            .iter()
            .any(|eye| in_ellipse(u, v, eye.u, EYE_V - 0.30, 0.17 * eye.foreshorten, 0.045))
    }

    fn nose_colour(&self, u: f32, v: f32) -> Option<Rgb> {
        if self.sin < 0.1 {
            return in_ellipse(u, v, 0.0, 0.40, 0.035, 0.03).then(|| shade(self.skin, 0.78));
        }
        let base = self.half_width(0.35) * self.sin;
        let tri = [(base, 0.22), (base, 0.46), (base + 0.16 * self.sin, 0.44)];
        in_triangle(u, v, tri).then(|| shade(self.skin, 0.92))
    }

    fn eye_colour(&self, eye: &Eye, u: f32, v: f32) -> Option<Rgb> {
        let x = (u - eye.u) / eye.half_w;
        let y = (v - eye.v) / eye.half_h;
        if x * x + y * y > 1.0 {
            return None;
        }
        if !in_ellipse(x, y, 0.0, 0.18, 0.9, 0.82) {
            return Some(LASH);
        }
        let g = eye.gaze;
        if in_ellipse(x, y, g - 0.22, -0.18, 0.16, 0.16) {
            return Some(WHITE);
        }
        if in_ellipse(x, y, g, 0.15, 0.26, 0.36) {
            return Some(PUPIL);
        }
        if in_ellipse(x, y, g, 0.12, 0.58, 0.72) {
            return Some(self.id.eye_colour.rgb());
        }
        Some(WHITE)
    }
}

fn shade(c: Rgb, f: f32) -> Rgb {
    c.map(|x| x * f)
}

fn in_ellipse(x: f32, y: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> bool {
    let dx = (x - cx) / rx;
    let dy = (y - cy) / ry;
    dx * dx + dy * dy <= 1.0
}

fn in_triangle(x: f32, y: f32, t: [(f32, f32); 3]) -> bool {
    let edge =
        |(ax, ay): (f32, f32), (bx, by): (f32, f32)| (bx - ax) * (y - ay) - (by - ay) * (x - ax);
    let d = [edge(t[0], t[1]), edge(t[1], t[2]), edge(t[2], t[0])];
    d.iter().all(|&e| e >= 0.0) || d.iter().all(|&e| e <= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::png_bytes;

    fn outside_boxes(x: u32, y: u32, boxes: &[[f32; 4]], margin: f32) -> bool {
        let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
        boxes.iter().all(|b| {
            cx < b[0] - margin - 0.5
                || cx > b[2] + margin + 0.5
                || cy < b[1] - margin - 0.5
                || cy > b[3] + margin + 0.5
        })
    }

    #[test]
    fn same_identity_view_and_eye_size_give_the_same_bytes() {
        let id = Identity::from_seed(3);
        let path = std::path::Path::new("x.png");
        let a = png_bytes(path, &render(&id, View::Deg45, 0.4, 64).image).unwrap();
        let b = png_bytes(path, &render(&id, View::Deg45, 0.4, 64).image).unwrap();
        assert_eq!(a, b);
        let other = png_bytes(path, &render(&id, View::Deg45, 0.41, 64).image).unwrap();
        assert_ne!(a, other);
    }

    #[test]
    fn eye_size_changes_only_pixels_inside_the_eye_boxes() {
        for seed in 0..24 {
            let id = Identity::from_seed(seed);
            for view in View::ALL {
                for size in [64, 97] {
                    let small = render(&id, view, 0.0, size);
                    let big = render(&id, view, 1.0, size);
                    let mut boxes = small.eye_boxes.clone();
                    boxes.extend_from_slice(&big.eye_boxes);
                    let mut inside_changes = 0;
                    for (x, y, p) in small.image.enumerate_pixels() {
                        let q = big.image.get_pixel(x, y);
                        if outside_boxes(x, y, &boxes, 1.0) {
                            assert_eq!(p, q, "seed {seed} {view} {size}: pixel ({x},{y})");
                        } else if p != q {
                            inside_changes += 1;
                        }
                    }
                    let min = (size * size / 200) as usize;
                    assert!(inside_changes > min, "seed {seed} {view}: {inside_changes}");
                }
            }
        }
    }

    #[test]
    fn eye_boxes_per_view_grow_with_eye_size_and_stay_in_the_image() {
        let cases = [(View::Front, 2), (View::Deg45, 2), (View::Side, 1)];
        for seed in 0..12 {
            let id = Identity::from_seed(seed);
            for (view, eyes) in cases {
                let small = render(&id, view, 0.0, 64).eye_boxes;
                let big = render(&id, view, 1.0, 64).eye_boxes;
                assert_eq!((small.len(), big.len()), (eyes, eyes), "{view}");
                for (s, b) in small.iter().zip(&big) {
                    assert!(b[2] - b[0] > 1.4 * (s[2] - s[0]), "{view}: {s:?} {b:?}");
                    assert!(b[3] - b[1] > 2.0 * (s[3] - s[1]), "{view}: {s:?} {b:?}");
                    let centre = |r: &[f32; 4]| [(r[0] + r[2]) / 2.0, (r[1] + r[3]) / 2.0];
                    let (cs, cb) = (centre(s), centre(b));
                    assert!((cs[0] - cb[0]).abs() < 1e-4 && (cs[1] - cb[1]).abs() < 1e-4);
                    assert!(b.iter().all(|&c| (0.0..=64.0).contains(&c)), "{b:?}");
                }
                // Left to right.
                assert!(big.windows(2).all(|w| w[0][0] < w[1][0]));
            }
        }
    }

    #[test]
    fn the_far_eye_at_45_degrees_is_narrower() {
        let id = Identity::from_seed(1);
        let boxes = render(&id, View::Deg45, 0.5, 64).eye_boxes;
        let width = |b: &[f32; 4]| b[2] - b[0];
        assert!(width(&boxes[1]) < 0.8 * width(&boxes[0]), "{boxes:?}");
    }

    #[test]
    fn views_differ_substantially() {
        for seed in 0..12 {
            let id = Identity::from_seed(seed);
            let images = View::ALL.map(|v| render(&id, v, 0.5, 64).image);
            for (i, j) in [(0, 1), (1, 2), (0, 2)] {
                let differing = images[i]
                    .pixels()
                    .zip(images[j].pixels())
                    .filter(|(a, b)| {
                        a.0.iter()
                            .zip(b.0)
                            .map(|(&x, y)| (x as i32 - y as i32).abs())
                            .sum::<i32>()
                            > 30
                    })
                    .count();
                assert!(
                    differing > 64 * 64 / 25,
                    "seed {seed} views {i},{j}: {differing}"
                );
            }
        }
    }

    #[test]
    fn view_names_round_trip() {
        for view in View::ALL {
            assert_eq!(view.name().parse::<View>().unwrap(), view);
        }
        assert!("back".parse::<View>().is_err());
    }

    #[test]
    fn out_of_range_eye_sizes_are_clamped() {
        let id = Identity::from_seed(2);
        let cases = [(-1.0, 0.0), (2.0, 1.0), (f32::NAN, 0.0)];
        for (given, clamped) in cases {
            assert_eq!(
                render(&id, View::Front, given, 32).image,
                render(&id, View::Front, clamped, 32).image,
                "{given}"
            );
        }
    }
}

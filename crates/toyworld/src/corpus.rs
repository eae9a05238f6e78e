//! Writing the toy world to disk: the shipped training pairs (one identity, small and big
//! eyes, three views) and captioned corpora in kohya's dataset layout (`NAME.png` +
//! `NAME.txt`, plus `labels.csv` with the ground truth). Every file is written atomically, and
//! item `i` of a corpus depends only on the seed and `i`, so a smaller corpus is a prefix of a
//! bigger one with the same seed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::caption::caption;
use crate::identity::Identity;
use crate::render::{View, render};

/// Eye size of the small-eye image of the shipped pairs.
pub const PAIR_SMALL_EYES: f32 = 0.1;
/// Eye size of the big-eye image of the shipped pairs.
pub const PAIR_BIG_EYES: f32 = 0.9;
/// The seed of the shipped pairs' identity.
pub const PAIR_SEED: u64 = 14;

/// A failure to write the toy world to disk.
#[derive(Debug, thiserror::Error)]
pub enum ToyError {
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode PNG for {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

/// One corpus image: what to draw and what to call it.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusItem {
    /// File stem, e.g. `000042_side`.
    pub name: String,
    /// Index of the identity (three consecutive items share one identity, one per view).
    pub identity_index: u64,
    pub identity: Identity,
    pub view: View,
    pub eye_size: f32,
}

impl CorpusItem {
    /// Item `index` of the corpus drawn from `seed`: identity `index / 3` (a ChaCha8 stream of
    /// its own), view `index % 3`, eye size uniform in `[0, 1]`.
    pub fn new(seed: u64, index: u64) -> CorpusItem {
        let identity_index = index / 3;
        let view = View::ALL[(index % 3) as usize];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(identity_index);
        let identity = Identity::sample(&mut rng);
        let mut eye_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        eye_rng.set_stream(index);
        let eye_size = eye_rng.random_range(0.0..=1.0);
        CorpusItem {
            name: format!("{index:06}_{}", view.name()),
            identity_index,
            identity,
            view,
            eye_size,
        }
    }
}

/// What [`write_corpus`] wrote.
#[derive(Debug, Clone)]
pub struct CorpusSummary {
    pub images: usize,
    pub labels: PathBuf,
}

/// Writes `count` images of `size` x `size` with captions into `dir`, and `labels.csv`
/// (`name,identity,view,eye_size,hair_style,hair_colour,eye_colour,skin,clothes,background,
/// face_width,jaw,eye_boxes` with boxes as `x0 y0 x1 y1` joined by `;`). `progress` is called
/// with the number of images written so far.
pub fn write_corpus(
    dir: &Path,
    count: usize,
    seed: u64,
    size: u32,
    progress: &mut dyn FnMut(usize),
) -> Result<CorpusSummary, ToyError> {
    create_dir(dir)?;
    let mut labels = String::from(
        "name,identity,view,eye_size,hair_style,hair_colour,eye_colour,skin,clothes,\
         background,face_width,jaw,eye_boxes\n",
    );
    for index in 0..count {
        let item = CorpusItem::new(seed, index as u64);
        let drawn = render(&item.identity, item.view, item.eye_size, size);
        save_png(&dir.join(format!("{}.png", item.name)), &drawn.image)?;
        let text = caption(&item.identity, item.view, item.eye_size);
        write_atomic(
            &dir.join(format!("{}.txt", item.name)),
            format!("{text}\n").as_bytes(),
        )?;
        label_row(&mut labels, &item, &drawn.eye_boxes);
        progress(index + 1);
    }
    let labels_path = dir.join("labels.csv");
    write_atomic(&labels_path, labels.as_bytes())?;
    tracing::info!(images = count, dir = %dir.display(), "corpus written");
    Ok(CorpusSummary {
        images: count,
        labels: labels_path,
    })
}

fn label_row(out: &mut String, item: &CorpusItem, boxes: &[[f32; 4]]) {
    let id = &item.identity;
    let boxes: Vec<String> = boxes
        .iter()
        .map(|b| format!("{:.3} {:.3} {:.3} {:.3}", b[0], b[1], b[2], b[3]))
        .collect();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{},{},{},{:.6},{},{},{},{},{},{},{:.4},{:.4},{}",
        item.name,
        item.identity_index,
        item.view,
        item.eye_size,
        id.hair_style.tag(),
        id.hair_colour.tag(),
        id.eye_colour.tag(),
        if id.skin.tag().is_empty() {
            "fair skin"
        } else {
            id.skin.tag()
        },
        id.clothes.tag(),
        id.background.tag(),
        id.face_width,
        id.jaw,
        boxes.join(";"),
    );
}

/// Writes the training pairs of the identity drawn from `seed` into `dir`:
/// `{small,big}_{front,45deg,side}.png`, eye sizes [`PAIR_SMALL_EYES`] and [`PAIR_BIG_EYES`].
/// Returns the paths written.
pub fn write_pairs(dir: &Path, seed: u64, size: u32) -> Result<Vec<PathBuf>, ToyError> {
    create_dir(dir)?;
    let identity = Identity::from_seed(seed);
    let mut written = Vec::new();
    for (label, eye_size) in [("small", PAIR_SMALL_EYES), ("big", PAIR_BIG_EYES)] {
        for view in View::ALL {
            let path = dir.join(format!("{label}_{}.png", view.name()));
            save_png(&path, &render(&identity, view, eye_size, size).image)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Encodes `image` as PNG and writes it atomically.
pub fn save_png(path: &Path, image: &RgbImage) -> Result<(), ToyError> {
    write_atomic(path, &png_bytes(path, image)?)
}

/// The PNG encoding of `image` (`path` only names the file in errors).
pub fn png_bytes(path: &Path, image: &RgbImage) -> Result<Vec<u8>, ToyError> {
    let mut bytes = Vec::new();
    image
        .write_with_encoder(image::codecs::png::PngEncoder::new(&mut bytes))
        .map_err(|source| ToyError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically, through the project's one atomic write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ToyError> {
    slider_atomic::write(path, bytes).map_err(|source| ToyError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), ToyError> {
    std::fs::create_dir_all(dir).map_err(|source| ToyError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_items_are_a_prefix_stable_function_of_seed_and_index() {
        let a: Vec<_> = (0..9).map(|i| CorpusItem::new(5, i)).collect();
        let b: Vec<_> = (0..9).map(|i| CorpusItem::new(5, i)).collect();
        assert_eq!(a, b);
        assert_ne!(
            CorpusItem::new(5, 0).identity,
            CorpusItem::new(6, 0).identity
        );
        // Three consecutive items: one identity, three views, three eye sizes.
        assert_eq!(a[0].identity, a[2].identity);
        assert_ne!(a[0].identity, a[3].identity);
        assert_eq!(
            a[..3].iter().map(|i| i.view).collect::<Vec<_>>(),
            View::ALL.to_vec()
        );
        assert_ne!(a[0].eye_size, a[1].eye_size);
    }

    #[test]
    fn corpus_eye_sizes_cover_the_range() {
        let sizes: Vec<f32> = (0..300).map(|i| CorpusItem::new(1, i).eye_size).collect();
        for bin in 0..5 {
            let lo = bin as f32 / 5.0;
            let n = sizes.iter().filter(|&&s| s >= lo && s < lo + 0.2).count();
            assert!((40..=80).contains(&n), "bin {bin}: {n} of 300");
        }
    }

    #[test]
    fn corpus_on_disk_has_image_caption_and_label_per_item() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = 0;
        let summary = write_corpus(dir.path(), 4, 3, 32, &mut |n| seen = n).unwrap();
        assert_eq!((summary.images, seen), (4, 4));
        for i in 0..4 {
            let item = CorpusItem::new(3, i);
            let img = image::open(dir.path().join(format!("{}.png", item.name))).unwrap();
            assert_eq!((img.width(), img.height()), (32, 32));
            let text =
                std::fs::read_to_string(dir.path().join(format!("{}.txt", item.name))).unwrap();
            assert_eq!(
                text.trim_end(),
                caption(&item.identity, item.view, item.eye_size)
            );
            assert_eq!(text.lines().count(), 1);
        }
        let labels = std::fs::read_to_string(&summary.labels).unwrap();
        let rows: Vec<&str> = labels.lines().collect();
        assert_eq!(rows.len(), 5);
        assert!(rows[1].starts_with("000000_front,0,front,"), "{}", rows[1]);
        assert_eq!(
            rows[3].rsplit(',').next().unwrap().split(';').count(),
            1,
            "side: one eye"
        );
        assert!(
            !std::fs::read_dir(dir.path()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp"))
        );
    }

    #[test]
    fn pairs_are_six_images_differing_only_by_eye_size() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_pairs(dir.path(), PAIR_SEED, 64).unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "small_front.png",
                "small_45deg.png",
                "small_side.png",
                "big_front.png",
                "big_45deg.png",
                "big_side.png"
            ]
        );
        for view in View::ALL {
            let load = |label: &str| {
                image::open(dir.path().join(format!("{label}_{}.png", view.name())))
                    .unwrap()
                    .to_rgb8()
            };
            let (small, big) = (load("small"), load("big"));
            let changed = small
                .pixels()
                .zip(big.pixels())
                .filter(|(a, b)| a != b)
                .count();
            assert!(
                changed > 10 && changed < 64 * 64 / 10,
                "{view}: {changed} pixels changed"
            );
        }
    }
}

//! `slider-toyworld`: a deterministic toy world for the eye-size slider. It draws a stylised
//! character head (with neck and shoulders on a plain background) from identity parameters
//! (face shape, hair style and colour, eye colour, skin, clothes, background), seen from the
//! front, at 45 degrees or from the side, with an `eye_size` in `[0, 1]` that changes only the
//! eyes. From it come the slider method's training pairs (one identity, small and big eyes,
//! three views), captioned corpora for pretraining a tiny base model, and the ground truth an
//! eye-size meter learns from. Pure Rust, no ML dependencies; same seed, same bytes.
//!
//! ```
//! use slider_toyworld::{Identity, View, caption, render};
//!
//! let who = Identity::from_seed(14);
//! let small = render(&who, View::Deg45, 0.1, 64);
//! let big = render(&who, View::Deg45, 0.9, 64);
//! assert_eq!(small.eye_boxes.len(), 2); // both eyes show at 45 degrees
//! assert!(big.eye_boxes[0][3] - big.eye_boxes[0][1] > small.eye_boxes[0][3] - small.eye_boxes[0][1]);
//! assert!(caption(&who, View::Deg45, 0.1).starts_with("1girl, solo"));
//! ```

pub mod caption;
pub mod corpus;
pub mod identity;
pub mod render;

pub use caption::{caption, view_tags};
pub use corpus::{
    CorpusItem, CorpusSummary, PAIR_BIG_EYES, PAIR_SEED, PAIR_SMALL_EYES, ToyError, png_bytes,
    save_png, write_atomic, write_corpus, write_pairs,
};
pub use identity::{
    Background, ClothesColour, EyeColour, HairColour, HairStyle, Identity, Rgb, Skin,
};
pub use render::{Render, UnknownView, View, render};

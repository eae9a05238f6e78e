//! Writes a contact sheet of the toy world: one row per identity (seeds FIRST..FIRST+ROWS),
//! columns front / 45deg / side with small eyes (0.1), then the same with big eyes (0.9).
//!
//! `cargo run -p slider-toyworld --example contact_sheet -- OUT.png [ROWS] [SIZE] [FIRST]`

use image::RgbImage;
use slider_toyworld::{Identity, View, render, save_png};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .ok_or("usage: contact_sheet OUT.png [ROWS] [SIZE] [FIRST]")?;
    let rows: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(8);
    let size: u32 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let first: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let mut sheet = RgbImage::new(6 * size, rows * size);
    for row in 0..rows {
        let who = Identity::from_seed(first + row as u64);
        for (col, (eye, view)) in [0.1, 0.9]
            .into_iter()
            .flat_map(|e| View::ALL.map(|v| (e, v)))
            .enumerate()
        {
            let cell = render(&who, view, eye, size).image;
            image::imageops::replace(
                &mut sheet,
                &cell,
                (col as u32 * size) as i64,
                (row * size) as i64,
            );
        }
    }
    save_png(std::path::Path::new(out), &sheet)?;
    Ok(())
}

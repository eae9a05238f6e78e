//! `slider-run toyworld`: the shipped training pairs are what the command writes, byte for
//! byte, and a corpus has an image, a one-line caption and a label row per item.

use std::path::Path;

use super::slider_run;

#[test]
fn toyworld_pairs_reproduce_the_shipped_assets() {
    let dir = tempfile::tempdir().unwrap();
    let out = slider_run()
        .args(["toyworld", "pairs", "--out"])
        .arg(dir.path())
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/pairs");
    for eyes in ["small", "big"] {
        for view in ["front", "45deg", "side"] {
            let name = format!("{eyes}_{view}.png");
            let made = std::fs::read(dir.path().join(&name)).unwrap();
            let kept = std::fs::read(shipped.join(&name)).unwrap();
            assert!(made == kept, "{name} differs from assets/pairs");
        }
    }
}

#[test]
fn toyworld_corpus_writes_images_captions_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    // `-v` before the subcommand: global flags go either side of it.
    let out = slider_run()
        .args([
            "-v", "toyworld", "corpus", "--count", "6", "--size", "32", "--out",
        ])
        .arg(dir.path())
        .output()
        .expect("binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let labels = std::fs::read_to_string(dir.path().join("labels.csv")).unwrap();
    let rows: Vec<&str> = labels.lines().skip(1).collect();
    assert_eq!(rows.len(), 6);
    for row in rows {
        let name = row.split(',').next().unwrap();
        let image = image::open(dir.path().join(format!("{name}.png"))).unwrap();
        assert_eq!((image.width(), image.height()), (32, 32), "{name}");
        let caption = std::fs::read_to_string(dir.path().join(format!("{name}.txt"))).unwrap();
        assert!(caption.starts_with("1girl, solo, "), "{caption}");
        assert_eq!(caption.lines().count(), 1, "{caption}");
    }
}

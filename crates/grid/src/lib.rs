//! X/Y check grids: images in rows and columns on a white sheet, column labels above, row
//! labels on the left, an optional title, text set in the DejaVu Sans font embedded in the
//! binary; and the PNG writer that carries the generation settings in text chunks.
//!
//! Same inputs, same bytes: layout is integer arithmetic, glyphs are rasterised by
//! `ab_glyph`, and the PNG encoder runs with fixed settings.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use ab_glyph::{Font, FontRef, GlyphId, PxScale, PxScaleFont, ScaleFont, point};
use image::{Rgb, RgbImage};

/// Pixels between neighbouring cells.
pub const GAP: u32 = 2;
/// White border around the whole sheet.
pub const MARGIN: u32 = 6;
/// Space between a label band (or the title) and what follows it.
pub const LABEL_PAD: u32 = 4;
/// Largest sheet `compose` will build (width x height), about 1 GiB of RGB.
pub const MAX_PIXELS: u64 = 1 << 28;

/// DejaVu Sans 2.37 (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
static FONT_TTF: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: [f32; 3] = [0.0, 0.0, 0.0];

#[derive(Debug, thiserror::Error)]
pub enum GridError {
    #[error("a grid needs at least one row and one column of images")]
    Empty,
    #[error(
        "row {row} has {found} images but row 0 has {expected}: every row needs the same number of columns"
    )]
    RaggedRow {
        row: usize,
        found: usize,
        expected: usize,
    },
    #[error(
        "the image at row {row}, column {column} is {found_width}x{found_height} but the first is {width}x{height}: every cell must have one size"
    )]
    CellSize {
        row: usize,
        column: usize,
        found_width: u32,
        found_height: u32,
        width: u32,
        height: u32,
    },
    #[error("{found} {axis} labels for {expected} {what}: give one per {item}, or none")]
    LabelCount {
        axis: &'static str,
        what: &'static str,
        item: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("the sheet would be {width}x{height} pixels, more than {MAX_PIXELS} in all")]
    TooLarge { width: u64, height: u64 },
    #[error("the embedded font cannot be read: {0}")]
    Font(String),
    #[error("PNG text keyword {keyword:?}: {reason}")]
    Keyword {
        keyword: String,
        reason: &'static str,
    },
    #[error("cannot encode the PNG for {path}: {source}")]
    Encode {
        path: PathBuf,
        source: png::EncodingError,
    },
    #[error("cannot decode the PNG {path}: {source}")]
    Decode {
        path: PathBuf,
        source: png::DecodingError,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `cell` drawn `factor` times larger: every pixel becomes a `factor` x `factor` square
/// (nearest neighbour, no smoothing, so a person sees the pixels the model made).
pub fn scale_up(cell: &RgbImage, factor: u32) -> Result<RgbImage, GridError> {
    let (w, h) = cell.dimensions();
    let factor = factor.max(1);
    let (sw, sh) = (
        u64::from(w) * u64::from(factor),
        u64::from(h) * u64::from(factor),
    );
    if sw * sh > MAX_PIXELS {
        return Err(GridError::TooLarge {
            width: sw,
            height: sh,
        });
    }
    // Both fit in u32: their product is at most MAX_PIXELS and each side is at least 1 when
    // the other is non-zero.
    let (sw, sh) = (
        u32::try_from(sw).unwrap_or(u32::MAX),
        u32::try_from(sh).unwrap_or(u32::MAX),
    );
    Ok(RgbImage::from_fn(sw, sh, |x, y| {
        *cell.get_pixel(x / factor, y / factor)
    }))
}

/// Where everything of a composed sheet lies, in pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct GridLayout {
    pub width: u32,
    pub height: u32,
    pub rows: usize,
    pub columns: usize,
    pub cell_width: u32,
    pub cell_height: u32,
    /// Left edge of column 0.
    pub cells_left: u32,
    /// Top edge of row 0.
    pub cells_top: u32,
    /// Rows `[title_top, title_top + title_height)` hold the title (height 0: no title).
    pub title_top: u32,
    pub title_height: u32,
    /// Rows `[column_labels_top, column_labels_top + column_labels_height)` hold the labels.
    pub column_labels_top: u32,
    pub column_labels_height: u32,
    /// Columns `[MARGIN, MARGIN + row_labels_width)` hold the row labels.
    pub row_labels_width: u32,
    /// Font size of the labels in pixels (the title is set 1.3x larger).
    pub font_px: f32,
}

impl GridLayout {
    /// Top-left pixel of the cell at `row`, `column`.
    pub fn cell_origin(&self, row: usize, column: usize) -> (u32, u32) {
        let step_x = self.cell_width + GAP;
        let step_y = self.cell_height + GAP;
        (
            self.cells_left + column as u32 * step_x,
            self.cells_top + row as u32 * step_y,
        )
    }
}

/// Lays out `cells` (rows of columns, all one size) with `x_labels` over the columns,
/// `y_labels` left of the rows (each: one per column/row, or empty for none) and an optional
/// title, and draws the sheet.
pub fn compose(
    cells: &[Vec<RgbImage>],
    x_labels: &[String],
    y_labels: &[String],
    title: Option<&str>,
) -> Result<RgbImage, GridError> {
    let (font, plan) = plan_cells(cells, x_labels, y_labels, title)?;
    let layout = &plan.layout;
    let mut sheet = RgbImage::from_pixel(layout.width, layout.height, BACKGROUND);
    for (r, row) in cells.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let (x, y) = layout.cell_origin(r, c);
            image::imageops::replace(&mut sheet, cell, i64::from(x), i64::from(y));
        }
    }
    let label_font = font.as_scaled(PxScale::from(layout.font_px));
    let title_font = font.as_scaled(PxScale::from(title_px(layout.font_px)));
    if let Some(lines) = &plan.title_lines {
        let clip = Rect::new(
            MARGIN,
            layout.title_top,
            layout.width - 2 * MARGIN,
            layout.title_height,
        );
        draw_block(&mut sheet, &title_font, lines, clip, VAlign::Top);
    }
    for (c, lines) in plan.column_lines.iter().enumerate() {
        let (x, _) = layout.cell_origin(0, c);
        let clip = Rect::new(
            x,
            layout.column_labels_top,
            layout.cell_width,
            layout.column_labels_height,
        );
        draw_block(&mut sheet, &label_font, lines, clip, VAlign::Bottom);
    }
    for (r, lines) in plan.row_lines.iter().enumerate() {
        let (_, y) = layout.cell_origin(r, 0);
        let clip = Rect::new(MARGIN, y, layout.row_labels_width, layout.cell_height);
        draw_block(&mut sheet, &label_font, lines, clip, VAlign::Middle);
    }
    Ok(sheet)
}

/// The layout `compose` would use for these cells and labels, without drawing.
pub fn layout(
    cells: &[Vec<RgbImage>],
    x_labels: &[String],
    y_labels: &[String],
    title: Option<&str>,
) -> Result<GridLayout, GridError> {
    Ok(plan_cells(cells, x_labels, y_labels, title)?.1.layout)
}

/// Writes `image` as an 8-bit RGB PNG, atomically (temp file in the same directory, fsync,
/// rename). Each `(keyword, text)` becomes a `tEXt` chunk, or an uncompressed `iTXt` chunk
/// when the text is not Latin-1 (e.g. `parameters` with A1111's settings line, `slider-run`
/// with JSON).
pub fn write_png(
    path: &Path,
    image: &RgbImage,
    text: &[(String, String)],
) -> Result<(), GridError> {
    let encode_err = |source| GridError::Encode {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Balanced);
        encoder.set_filter(png::Filter::Adaptive);
        for (keyword, value) in text {
            check_keyword(keyword)?;
            if is_latin1(value) {
                encoder.add_text_chunk(keyword.clone(), value.clone())
            } else {
                encoder.add_itxt_chunk(keyword.clone(), value.clone())
            }
            .map_err(encode_err)?;
        }
        let mut writer = encoder.write_header().map_err(encode_err)?;
        writer
            .write_image_data(image.as_raw())
            .map_err(encode_err)?;
        writer.finish().map_err(encode_err)?;
    }
    write_atomic(path, &bytes)
}

/// The text chunks (`tEXt`, `zTXt`, `iTXt`) of a PNG file, in file order by kind.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>, GridError> {
    let decode_err = |source| GridError::Decode {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|source| GridError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = png::Decoder::new(BufReader::new(file))
        .read_info()
        .map_err(decode_err)?;
    // Text chunks may also follow the image data: read the frame, then the trailer.
    let size = reader.output_buffer_size().unwrap_or(0);
    let mut buf = vec![0; size];
    reader.next_frame(&mut buf).map_err(decode_err)?;
    reader.finish().map_err(decode_err)?;
    let info = reader.info();
    let mut out = Vec::new();
    for chunk in &info.uncompressed_latin1_text {
        out.push((chunk.keyword.clone(), chunk.text.clone()));
    }
    for chunk in &info.compressed_latin1_text {
        out.push((chunk.keyword.clone(), chunk.get_text().map_err(decode_err)?));
    }
    for chunk in &info.utf8_text {
        out.push((chunk.keyword.clone(), chunk.get_text().map_err(decode_err)?));
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically (see [`slider_atomic::write`]), as a [`GridError`].
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), GridError> {
    slider_atomic::write(path, bytes).map_err(|source| GridError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn embedded_font() -> Result<FontRef<'static>, GridError> {
    FontRef::try_from_slice(FONT_TTF).map_err(|e| GridError::Font(e.to_string()))
}

/// The common cell size, after checking the grid is rectangular and uniform.
fn check_cells(cells: &[Vec<RgbImage>]) -> Result<(u32, u32), GridError> {
    let first = cells
        .first()
        .and_then(|row| row.first())
        .ok_or(GridError::Empty)?;
    let (width, height) = first.dimensions();
    if width == 0 || height == 0 {
        return Err(GridError::Empty);
    }
    let expected = cells[0].len();
    for (row, images) in cells.iter().enumerate() {
        if images.len() != expected {
            return Err(GridError::RaggedRow {
                row,
                found: images.len(),
                expected,
            });
        }
        for (column, image) in images.iter().enumerate() {
            if image.dimensions() != (width, height) {
                return Err(GridError::CellSize {
                    row,
                    column,
                    found_width: image.width(),
                    found_height: image.height(),
                    width,
                    height,
                });
            }
        }
    }
    Ok((width, height))
}

struct LayoutPlan {
    layout: GridLayout,
    title_lines: Option<Vec<String>>,
    column_lines: Vec<Vec<String>>,
    row_lines: Vec<Vec<String>>,
}

/// Label font size for a cell size: a fifth of the smaller side, between 12 and 32 px.
fn label_px(cell_width: u32, cell_height: u32) -> f32 {
    (cell_width.min(cell_height) as f32 * 0.2)
        .clamp(12.0, 32.0)
        .round()
}

fn title_px(label_px: f32) -> f32 {
    (label_px * 1.3).round()
}

/// Checks `cells` and plans their sheet with the embedded font (shared by [`compose`] and
/// [`layout`]).
fn plan_cells(
    cells: &[Vec<RgbImage>],
    x_labels: &[String],
    y_labels: &[String],
    title: Option<&str>,
) -> Result<(FontRef<'static>, LayoutPlan), GridError> {
    let (cell_width, cell_height) = check_cells(cells)?;
    let font = embedded_font()?;
    let plan = plan_layout(
        &font,
        (cells.len(), cells[0].len()),
        (cell_width, cell_height),
        x_labels,
        y_labels,
        title,
    )?;
    Ok((font, plan))
}

fn plan_layout(
    font: &FontRef<'static>,
    (rows, columns): (usize, usize),
    (cell_width, cell_height): (u32, u32),
    x_labels: &[String],
    y_labels: &[String],
    title: Option<&str>,
) -> Result<LayoutPlan, GridError> {
    check_label_count("column", "columns", "column", x_labels.len(), columns)?;
    check_label_count("row", "rows", "row", y_labels.len(), rows)?;
    let font_px = label_px(cell_width, cell_height);
    let label_font = font.as_scaled(PxScale::from(font_px));
    let title_font = font.as_scaled(PxScale::from(title_px(font_px)));

    let column_lines: Vec<Vec<String>> = x_labels
        .iter()
        .map(|l| wrap(&label_font, l, cell_width as f32))
        .collect();
    let column_labels_height = column_lines
        .iter()
        .map(|lines| block_height(&label_font, lines.len()))
        .max()
        .unwrap_or(0);

    // Row labels may take up to twice a cell's width (at least ten em) before wrapping.
    let row_limit = (2 * cell_width).max((10.0 * font_px) as u32) as f32;
    let row_lines: Vec<Vec<String>> = y_labels
        .iter()
        .map(|l| wrap(&label_font, l, row_limit))
        .collect();
    let row_labels_width = row_lines
        .iter()
        .flatten()
        .map(|line| text_width(&label_font, line).ceil() as u32)
        .max()
        .unwrap_or(0);

    let cells_width =
        columns as u64 * u64::from(cell_width) + (columns as u64 - 1) * u64::from(GAP);
    let cells_height = rows as u64 * u64::from(cell_height) + (rows as u64 - 1) * u64::from(GAP);
    let band = |size: u32| {
        if size == 0 {
            0
        } else {
            u64::from(size + LABEL_PAD)
        }
    };
    let width = u64::from(MARGIN) + band(row_labels_width) + cells_width + u64::from(MARGIN);

    let title_lines = title
        .filter(|t| !t.trim().is_empty())
        .map(|t| wrap(&title_font, t, (width - 2 * u64::from(MARGIN)) as f32));
    let title_height = title_lines
        .as_ref()
        .map_or(0, |lines| block_height(&title_font, lines.len()));
    let height = u64::from(MARGIN)
        + band(title_height)
        + band(column_labels_height)
        + cells_height
        + u64::from(MARGIN);
    if width * height > MAX_PIXELS {
        return Err(GridError::TooLarge { width, height });
    }
    let title_top = MARGIN;
    let column_labels_top = title_top + band(title_height) as u32;
    let layout = GridLayout {
        width: width as u32,
        height: height as u32,
        rows,
        columns,
        cell_width,
        cell_height,
        cells_left: MARGIN + band(row_labels_width) as u32,
        cells_top: column_labels_top + band(column_labels_height) as u32,
        title_top,
        title_height,
        column_labels_top,
        column_labels_height,
        row_labels_width,
        font_px,
    };
    Ok(LayoutPlan {
        layout,
        title_lines,
        column_lines,
        row_lines,
    })
}

fn check_label_count(
    axis: &'static str,
    what: &'static str,
    item: &'static str,
    found: usize,
    expected: usize,
) -> Result<(), GridError> {
    if found == 0 || found == expected {
        Ok(())
    } else {
        Err(GridError::LabelCount {
            axis,
            what,
            item,
            found,
            expected,
        })
    }
}

type Scaled<'a> = PxScaleFont<&'a FontRef<'static>>;

fn line_height(font: &Scaled<'_>) -> u32 {
    (font.ascent() - font.descent()).ceil() as u32 + 1
}

fn block_height(font: &Scaled<'_>, lines: usize) -> u32 {
    line_height(font) * lines as u32
}

/// Advance width of `text` on one line, kerning included.
fn text_width(font: &Scaled<'_>, text: &str) -> f32 {
    let mut width = 0.0;
    let mut previous: Option<GlyphId> = None;
    for ch in text.chars() {
        let id = font.glyph_id(ch);
        if let Some(prev) = previous {
            width += font.kern(prev, id);
        }
        width += font.h_advance(id);
        previous = Some(id);
    }
    width
}

/// Greedy word wrap to `max_width` pixels; a word wider than a line is broken between
/// characters. Always at least one line.
fn wrap(font: &Scaled<'_>, text: &str, max_width: f32) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let candidate = if line.is_empty() {
            word.to_string()
        } else {
            format!("{line} {word}")
        };
        if text_width(font, &candidate) <= max_width {
            line = candidate;
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        for ch in word.chars() {
            let mut next = line.clone();
            next.push(ch);
            if !line.is_empty() && text_width(font, &next) > max_width {
                lines.push(std::mem::take(&mut line));
                line.push(ch);
            } else {
                line = next;
            }
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[derive(Clone, Copy)]
struct Rect {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

impl Rect {
    fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self {
            x,
            y,
            width,
            height,
        }
    }
}

#[derive(Clone, Copy)]
enum VAlign {
    Top,
    Middle,
    Bottom,
}

/// Draws `lines`, each centred horizontally in `clip`, the block aligned vertically as
/// asked; nothing outside `clip` is touched.
fn draw_block(
    sheet: &mut RgbImage,
    font: &Scaled<'_>,
    lines: &[String],
    clip: Rect,
    align: VAlign,
) {
    let line_h = line_height(font) as i64;
    let block = line_h * lines.len() as i64;
    let top = i64::from(clip.y)
        + match align {
            VAlign::Top => 0,
            VAlign::Middle => (i64::from(clip.height) - block) / 2,
            VAlign::Bottom => i64::from(clip.height) - block,
        };
    for (i, line) in lines.iter().enumerate() {
        let width = text_width(font, line);
        let left = clip.x as f32 + ((clip.width as f32 - width) / 2.0).max(0.0).floor();
        let baseline = (top + i as i64 * line_h) as f32 + font.ascent().ceil();
        draw_line(sheet, font, line, left, baseline, clip);
    }
}

fn draw_line(
    sheet: &mut RgbImage,
    font: &Scaled<'_>,
    text: &str,
    left: f32,
    baseline: f32,
    clip: Rect,
) {
    let mut caret = left;
    let mut previous: Option<GlyphId> = None;
    for ch in text.chars() {
        let id = font.glyph_id(ch);
        if let Some(prev) = previous {
            caret += font.kern(prev, id);
        }
        let glyph = id.with_scale_and_position(font.scale(), point(caret, baseline));
        caret += font.h_advance(id);
        previous = Some(id);
        let Some(outline) = font.outline_glyph(glyph) else {
            continue; // whitespace
        };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let x = bounds.min.x as i64 + i64::from(gx);
            let y = bounds.min.y as i64 + i64::from(gy);
            let inside = x >= i64::from(clip.x)
                && y >= i64::from(clip.y)
                && x < i64::from(clip.x + clip.width)
                && y < i64::from(clip.y + clip.height);
            if !inside || x >= i64::from(sheet.width()) || y >= i64::from(sheet.height()) {
                return;
            }
            let coverage = coverage.clamp(0.0, 1.0);
            let pixel = sheet.get_pixel_mut(x as u32, y as u32);
            for (channel, ink) in pixel.0.iter_mut().zip(INK) {
                let blended = f32::from(*channel) * (1.0 - coverage) + ink * coverage;
                *channel = blended.round() as u8;
            }
        });
    }
}

fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| u32::from(c) <= 0xFF && c != '\0')
}

/// PNG keywords: 1-79 Latin-1 printable characters, no leading, trailing or double spaces.
fn check_keyword(keyword: &str) -> Result<(), GridError> {
    let bad = |reason| {
        Err(GridError::Keyword {
            keyword: keyword.to_string(),
            reason,
        })
    };
    let count = keyword.chars().count();
    if count == 0 || count > 79 {
        return bad("must be 1 to 79 characters long");
    }
    if !keyword
        .chars()
        .all(|c| matches!(u32::from(c), 0x20..=0x7E | 0xA1..=0xFF))
    {
        return bad("must be printable Latin-1");
    }
    if keyword.starts_with(' ') || keyword.ends_with(' ') || keyword.contains("  ") {
        return bad("must not start or end with a space or hold two in a row");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(width: u32, height: u32, value: u8) -> RgbImage {
        RgbImage::from_pixel(width, height, Rgb([value, value / 2, 255 - value]))
    }

    fn grid(rows: usize, columns: usize, width: u32, height: u32) -> Vec<Vec<RgbImage>> {
        (0..rows)
            .map(|r| {
                (0..columns)
                    .map(|c| solid(width, height, (10 + 40 * r + 7 * c) as u8))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn scaling_up_makes_each_pixel_a_square() {
        let mut cell = RgbImage::new(2, 1);
        cell.put_pixel(0, 0, Rgb([1, 2, 3]));
        cell.put_pixel(1, 0, Rgb([200, 100, 50]));
        let big = scale_up(&cell, 3).unwrap();
        assert_eq!(big.dimensions(), (6, 3));
        for (x, y, p) in big.enumerate_pixels() {
            assert_eq!(p, cell.get_pixel(x / 3, y / 3), "({x}, {y})");
        }
        assert_eq!(scale_up(&cell, 1).unwrap(), cell);
        assert!(matches!(
            scale_up(&RgbImage::new(1, 1), 1 << 15),
            Err(GridError::TooLarge { .. })
        ));
    }

    fn labels(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix} {i}")).collect()
    }

    /// Dark pixels (all channels below 128) in the rectangle.
    fn dark_pixels(sheet: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
        let mut n = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                if sheet.get_pixel(x, y).0.iter().all(|&v| v < 128) {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn sheet_size_without_labels_is_cells_gaps_and_margins() {
        // (rows, columns, cell w, cell h)
        let cases = [
            (1, 1, 64, 64),
            (2, 3, 64, 48),
            (7, 8, 16, 32),
            (1, 5, 10, 10),
        ];
        for (rows, columns, w, h) in cases {
            let cells = grid(rows, columns, w, h);
            let sheet = compose(&cells, &[], &[], None).unwrap();
            let expected_w = 2 * MARGIN + columns as u32 * w + (columns as u32 - 1) * GAP;
            let expected_h = 2 * MARGIN + rows as u32 * h + (rows as u32 - 1) * GAP;
            assert_eq!(
                sheet.dimensions(),
                (expected_w, expected_h),
                "{rows}x{columns} of {w}x{h}"
            );
        }
    }

    #[test]
    fn sheet_size_with_labels_adds_the_bands() {
        let cells = grid(2, 3, 64, 64);
        let (x, y) = (labels("w", 3), labels("seed", 2));
        let l = layout(&cells, &x, &y, Some("eyesize")).unwrap();
        assert!(l.title_height > 0 && l.column_labels_height > 0 && l.row_labels_width > 0);
        assert_eq!(l.cells_left, MARGIN + l.row_labels_width + LABEL_PAD);
        assert_eq!(
            l.cells_top,
            MARGIN + l.title_height + LABEL_PAD + l.column_labels_height + LABEL_PAD
        );
        assert_eq!(l.width, l.cells_left + 3 * 64 + 2 * GAP + MARGIN);
        assert_eq!(l.height, l.cells_top + 2 * 64 + GAP + MARGIN);
        let sheet = compose(&cells, &x, &y, Some("eyesize")).unwrap();
        assert_eq!(sheet.dimensions(), (l.width, l.height));
    }

    #[test]
    fn every_cell_is_copied_unchanged_to_its_origin() {
        let cells = grid(3, 4, 20, 12);
        let (x, y) = (labels("col", 4), labels("row", 3));
        let sheet = compose(&cells, &x, &y, Some("title")).unwrap();
        let l = layout(&cells, &x, &y, Some("title")).unwrap();
        for (r, row) in cells.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                let (ox, oy) = l.cell_origin(r, c);
                let copied = image::imageops::crop_imm(&sheet, ox, oy, 20, 12).to_image();
                assert_eq!(&copied, cell, "cell {r},{c}");
            }
        }
    }

    #[test]
    fn labels_and_title_draw_dark_pixels_in_their_bands_only() {
        let cells = grid(2, 2, 64, 64);
        let (x, y) = (labels("weight", 2), labels("seed", 2));
        let sheet = compose(&cells, &x, &y, Some("eyesize")).unwrap();
        let l = layout(&cells, &x, &y, Some("eyesize")).unwrap();
        let title = dark_pixels(
            &sheet,
            0,
            l.title_top,
            l.width,
            l.title_top + l.title_height,
        );
        let column_band = dark_pixels(
            &sheet,
            l.cells_left,
            l.column_labels_top,
            l.width,
            l.column_labels_top + l.column_labels_height,
        );
        let row_band = dark_pixels(
            &sheet,
            MARGIN,
            l.cells_top,
            MARGIN + l.row_labels_width,
            l.height,
        );
        assert!(title > 20, "title: {title} dark pixels");
        assert!(column_band > 20, "column labels: {column_band} dark pixels");
        assert!(row_band > 20, "row labels: {row_band} dark pixels");
        // Without labels the same bands do not exist and the margins stay white.
        let bare = compose(&cells, &[], &[], None).unwrap();
        assert_eq!(dark_pixels(&bare, 0, 0, bare.width(), MARGIN), 0);
        assert_eq!(dark_pixels(&bare, 0, 0, MARGIN, bare.height()), 0);
    }

    #[test]
    fn long_labels_wrap_inside_their_column() {
        let cells = grid(1, 2, 64, 64);
        let short = compose(&cells, &labels("w", 2), &[], None).unwrap();
        let long_labels = vec!["1girl, red hair, side view".to_string(), "x".to_string()];
        let l_short = layout(&cells, &labels("w", 2), &[], None).unwrap();
        let l_long = layout(&cells, &long_labels, &[], None).unwrap();
        assert!(l_long.column_labels_height >= 2 * l_short.column_labels_height);
        assert_eq!(
            l_long.width,
            short.width(),
            "wrapping never widens the sheet"
        );
        let sheet = compose(&cells, &long_labels, &[], None).unwrap();
        let (x1, _) = l_long.cell_origin(0, 1);
        // Nothing of the long label spills into the gap between the columns.
        let gap = dark_pixels(&sheet, x1 - GAP, 0, x1, l_long.cells_top);
        assert_eq!(gap, 0);
    }

    /// (case, cells, column labels, row labels, expected message)
    type BadGrid = (
        &'static str,
        Vec<Vec<RgbImage>>,
        Vec<String>,
        Vec<String>,
        &'static str,
    );

    #[test]
    fn bad_grids_are_errors() {
        let ragged = vec![grid(1, 3, 8, 8).remove(0), grid(1, 2, 8, 8).remove(0)];
        let mut mixed = grid(2, 2, 8, 8);
        mixed[1][1] = solid(8, 9, 0);
        let cases: Vec<BadGrid> = vec![
            ("no rows", vec![], vec![], vec![], "at least one row"),
            (
                "empty row",
                vec![vec![]],
                vec![],
                vec![],
                "at least one row",
            ),
            (
                "ragged",
                ragged,
                vec![],
                vec![],
                "row 1 has 2 images but row 0 has 3",
            ),
            (
                "mixed sizes",
                mixed,
                vec![],
                vec![],
                "row 1, column 1 is 8x9 but the first is 8x8",
            ),
            (
                "x labels",
                grid(2, 3, 8, 8),
                labels("w", 2),
                vec![],
                "2 column labels for 3 columns",
            ),
            (
                "y labels",
                grid(2, 3, 8, 8),
                vec![],
                labels("s", 3),
                "3 row labels for 2 rows",
            ),
        ];
        for (name, cells, x, y, message) in cases {
            let err = compose(&cells, &x, &y, None).unwrap_err().to_string();
            assert!(err.contains(message), "{name}: {err}");
        }
    }

    #[test]
    fn same_inputs_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cells = grid(2, 3, 32, 32);
        let (x, y) = (labels("w", 3), labels("seed", 2));
        let text = vec![("parameters".to_string(), "Steps: 20".to_string())];
        let mut files = Vec::new();
        for i in 0..2 {
            let sheet = compose(&cells, &x, &y, Some("t")).unwrap();
            let path = dir.path().join(format!("{i}.png"));
            write_png(&path, &sheet, &text).unwrap();
            files.push(std::fs::read(path).unwrap());
        }
        assert_eq!(files[0], files[1]);
    }

    #[test]
    fn text_chunks_and_pixels_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let sheet = compose(&grid(2, 2, 16, 16), &labels("w", 2), &[], None).unwrap();
        let text = vec![
            (
                "parameters".to_string(),
                "1girl\nNegative prompt: lowres\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64".to_string(),
            ),
            ("slider-run".to_string(), r#"{"weights":[-2,0,2],"name":"café"}"#.to_string()),
            ("Comment".to_string(), "eyes → bigger".to_string()), // not Latin-1: iTXt
        ];
        write_png(&path, &sheet, &text).unwrap();
        let mut back = read_png_text(&path).unwrap();
        back.sort();
        let mut expected = text.clone();
        expected.sort();
        assert_eq!(back, expected);
        let decoded = image::open(&path).unwrap().to_rgb8();
        assert_eq!(decoded, sheet);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn bad_keywords_are_errors_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let sheet = solid(4, 4, 0);
        for keyword in [
            "",
            " lead",
            "trail ",
            "two  spaces",
            "tab\t",
            &"k".repeat(80),
            "ключ",
        ] {
            let text = vec![(keyword.to_string(), "v".to_string())];
            let err = write_png(&path, &sheet, &text).unwrap_err();
            assert!(
                matches!(err, GridError::Keyword { .. }),
                "{keyword:?}: {err}"
            );
            assert!(!path.exists());
        }
    }
}

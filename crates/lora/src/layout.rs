//! The module lists of the layouts we know (SD1.x, SDXL, a tiny made-up UNet for tests and
//! demos; FLUX.1 and SD3.5 transformers from `transformer.rs` in each of their namings),
//! derived from the architectures, and layout detection of a LoRA.
//!
//! SD1.x: 16 transformer blocks (3 down levels x 2, mid x 1, 3 up levels x 3) x 12 modules
//! = 192, diffusers-style names, 1x1-conv `proj_in`/`proj_out`, context 768.
//! SDXL: 70 transformer blocks x 10 + 11 transformers x (`proj_in`, `proj_out`) = 722,
//! original-UNet names, linear projections, context 2048.

use std::collections::BTreeMap;

use crate::Lora;
use crate::module::{Module, ModuleKind};
use crate::transformer::{Model, Naming};

/// A model layout with a known list of adapted modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    Sd1,
    Sdxl,
    /// A small made-up UNet-like layout (channels <= 64) with kohya-style names, a mix of
    /// linear, 1x1-conv and 3x3-conv modules: for tests and demos.
    Tiny,
    Flux,
    Sd35Large,
    Sd35Medium,
}

/// Every layout, in detection order.
pub const LAYOUTS: [Layout; 6] = [
    Layout::Sd1,
    Layout::Sdxl,
    Layout::Tiny,
    Layout::Flux,
    Layout::Sd35Large,
    Layout::Sd35Medium,
];

impl Layout {
    pub fn label(self) -> &'static str {
        match self {
            Layout::Sd1 => "SD1.x UNet",
            Layout::Sdxl => "SDXL UNet",
            Layout::Tiny => "tiny test UNet",
            Layout::Flux => Model::Flux.label(),
            Layout::Sd35Large => Model::Sd35Large.label(),
            Layout::Sd35Medium => Model::Sd35Medium.label(),
        }
    }

    /// The transformer model of a FLUX.1 / SD3.5 layout.
    pub fn transformer(self) -> Option<Model> {
        match self {
            Layout::Flux => Some(Model::Flux),
            Layout::Sd35Large => Some(Model::Sd35Large),
            Layout::Sd35Medium => Some(Model::Sd35Medium),
            Layout::Sd1 | Layout::Sdxl | Layout::Tiny => None,
        }
    }

    /// The namings files of this layout use: kohya only for the UNet layouts (diffusers
    /// names of those are renamed to kohya's on reading).
    pub fn namings(self) -> &'static [Naming] {
        match self.transformer() {
            Some(_) => &[Naming::Kohya, Naming::Diffusers, Naming::ComfyUi],
            None => &[Naming::Kohya],
        }
    }

    /// The modules kohya's `networks.lora` adapts in this layout (no conv_dim options, plus
    /// the tiny layout's two 3x3 convs; for the transformers every linear layer), in kohya
    /// names, sorted by name.
    pub fn modules(self) -> Vec<ModuleSpec> {
        self.modules_named(Naming::Kohya)
    }

    /// The modules in one naming (empty for a naming the layout does not use), sorted.
    pub fn modules_named(self, naming: Naming) -> Vec<ModuleSpec> {
        let mut v = match (self, naming) {
            (Layout::Sd1, Naming::Kohya) => sd1_modules(),
            (Layout::Sdxl, Naming::Kohya) => sdxl_modules(),
            (Layout::Tiny, Naming::Kohya) => tiny_modules(),
            (Layout::Sd1 | Layout::Sdxl | Layout::Tiny, _) => Vec::new(),
            _ => self
                .transformer()
                .map(|m| transformer_modules(m, naming))
                .unwrap_or_default(),
        };
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

fn transformer_modules(model: Model, naming: Naming) -> Vec<ModuleSpec> {
    let mut v = Vec::new();
    for layer in model.layers() {
        let whole = |name: String| ModuleSpec {
            name,
            kind: ModuleKind::Linear,
            out_dim: layer.out_dim,
            in_dim: layer.in_dim,
        };
        match naming {
            Naming::Kohya => v.push(whole(layer.kohya_name())),
            Naming::ComfyUi => v.push(whole(layer.comfyui_name())),
            Naming::Diffusers => {
                for (part, name) in layer.parts.iter().zip(layer.diffusers_names()) {
                    v.push(ModuleSpec {
                        name,
                        kind: ModuleKind::Linear,
                        out_dim: part.rows,
                        in_dim: layer.in_dim,
                    });
                }
            }
        }
    }
    v
}

/// Name and base-weight shape of one adaptable module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    pub name: String,
    pub kind: ModuleKind,
    pub out_dim: usize,
    pub in_dim: usize,
}

/// The 10 modules of one transformer block; `ff_inner` is the GEGLU hidden width.
fn transformer_block(
    out: &mut Vec<ModuleSpec>,
    prefix: &str,
    channels: usize,
    context: usize,
    ff_inner: usize,
) {
    let mut add = |suffix: &str, out_dim: usize, in_dim: usize| {
        out.push(ModuleSpec {
            name: format!("{prefix}_{suffix}"),
            kind: ModuleKind::Linear,
            out_dim,
            in_dim,
        })
    };
    for attn in ["attn1", "attn2"] {
        let kv_in = if attn == "attn1" { channels } else { context };
        add(&format!("{attn}_to_q"), channels, channels);
        add(&format!("{attn}_to_k"), channels, kv_in);
        add(&format!("{attn}_to_v"), channels, kv_in);
        add(&format!("{attn}_to_out_0"), channels, channels);
    }
    add("ff_net_0_proj", 2 * ff_inner, channels);
    add("ff_net_2", channels, ff_inner);
}

/// A `Transformer2DModel`: proj_in, `depth` blocks, proj_out.
fn transformer(
    out: &mut Vec<ModuleSpec>,
    prefix: &str,
    channels: usize,
    context: usize,
    depth: usize,
    proj: ModuleKind,
    ff_inner: usize,
) {
    for p in ["proj_in", "proj_out"] {
        out.push(ModuleSpec {
            name: format!("{prefix}_{p}"),
            kind: proj,
            out_dim: channels,
            in_dim: channels,
        });
    }
    for b in 0..depth {
        transformer_block(
            out,
            &format!("{prefix}_transformer_blocks_{b}"),
            channels,
            context,
            ff_inner,
        );
    }
}

fn sd1_modules() -> Vec<ModuleSpec> {
    let conv1 = ModuleKind::Conv { kh: 1, kw: 1 };
    let mut v = Vec::new();
    let mut add = |prefix: String, c: usize| transformer(&mut v, &prefix, c, 768, 1, conv1, 4 * c);
    for (level, c) in [(0, 320), (1, 640), (2, 1280)] {
        for a in 0..2 {
            add(format!("lora_unet_down_blocks_{level}_attentions_{a}"), c);
        }
    }
    add("lora_unet_mid_block_attentions_0".into(), 1280);
    for (level, c) in [(1, 1280), (2, 640), (3, 320)] {
        for a in 0..3 {
            add(format!("lora_unet_up_blocks_{level}_attentions_{a}"), c);
        }
    }
    v
}

fn sdxl_modules() -> Vec<ModuleSpec> {
    let mut v = Vec::new();
    let mut add = |prefix: String, c: usize, depth: usize| {
        transformer(&mut v, &prefix, c, 2048, depth, ModuleKind::Linear, 4 * c)
    };
    for (block, c, depth) in [(4, 640, 2), (5, 640, 2), (7, 1280, 10), (8, 1280, 10)] {
        add(format!("lora_unet_input_blocks_{block}_1"), c, depth);
    }
    add("lora_unet_middle_block_1".into(), 1280, 10);
    for block in 0..6 {
        let (c, depth) = if block < 3 { (1280, 10) } else { (640, 2) };
        add(format!("lora_unet_output_blocks_{block}_1"), c, depth);
    }
    v
}

fn tiny_modules() -> Vec<ModuleSpec> {
    let conv1 = ModuleKind::Conv { kh: 1, kw: 1 };
    let mut v = Vec::new();
    for (prefix, c) in [
        ("lora_unet_down_blocks_0_attentions_0", 16),
        ("lora_unet_mid_block_attentions_0", 32),
        ("lora_unet_up_blocks_1_attentions_0", 16),
    ] {
        transformer(&mut v, prefix, c, 24, 1, conv1, c);
    }
    for (name, c) in [
        ("lora_unet_down_blocks_0_resnets_0_conv1", 16),
        ("lora_unet_up_blocks_1_resnets_0_conv2", 16),
    ] {
        v.push(ModuleSpec {
            name: name.into(),
            kind: ModuleKind::Conv { kh: 3, kw: 3 },
            out_dim: c,
            in_dim: c,
        });
    }
    v
}

/// What a LoRA adapts: its UNet / transformer layout (if it has such modules), the naming
/// its modules are written in, and its text-encoder parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutReport {
    /// `None` when the LoRA has no UNet / transformer modules.
    pub unet: Option<UnetLayout>,
    /// The naming of the detected layout's modules (kohya for the UNet layouts).
    pub naming: Option<Naming>,
    /// Text-encoder parts present: `te` (SD1 CLIP), `te1`, `te2`, `te3` (kohya's SDXL /
    /// FLUX.1 / SD3 prefixes), `text_encoder`, `text_encoder_2`, `text_encoder_3` (diffusers).
    pub text_encoders: Vec<String>,
}

/// The UNet layout a LoRA was detected to target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetLayout {
    Known(Layout),
    Unknown,
}

impl LayoutReport {
    /// A one-line description, e.g. `SDXL UNet + text encoders te1, te2`.
    pub fn describe(&self) -> String {
        let unet = match self.unet {
            Some(UnetLayout::Known(l)) => match (l.transformer(), self.naming) {
                (Some(_), Some(n)) => format!("{} ({} names)", l.label(), n.label()),
                _ => l.label().to_string(),
            },
            Some(UnetLayout::Unknown) => "unknown UNet layout".to_string(),
            None => "no UNet modules".to_string(),
        };
        if self.text_encoders.is_empty() {
            unet
        } else {
            format!("{unet} + text encoders {}", self.text_encoders.join(", "))
        }
    }

    /// The known UNet layout, if one was detected.
    pub fn known(&self) -> Option<Layout> {
        match self.unet {
            Some(UnetLayout::Known(l)) => Some(l),
            _ => None,
        }
    }
}

/// Text-encoder module prefixes and how the report names them.
const TEXT_ENCODERS: [(&str, &str); 7] = [
    ("lora_te_", "te"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("text_encoder.", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
];

/// True for a text-encoder module (kept as it is by every layout conversion).
pub fn is_text_encoder(name: &str) -> bool {
    TEXT_ENCODERS.iter().any(|(p, _)| name.starts_with(p))
}

/// Detects the layout: the known (layout, naming) in which every module of the LoRA that
/// it lists has the listed shape, and that lists the most of them. Modules outside the list
/// (e.g. LoCon's ResNet convs) do not prevent detection.
pub fn detect(lora: &Lora) -> LayoutReport {
    let text_encoders = TEXT_ENCODERS
        .iter()
        .filter(|(prefix, _)| lora.modules.keys().any(|n| n.starts_with(prefix)))
        .map(|(_, label)| label.to_string())
        .collect();
    let model: Vec<(&String, &Module)> = lora
        .modules
        .iter()
        .filter(|(n, _)| !is_text_encoder(n))
        .collect();
    if model.is_empty() {
        return LayoutReport {
            unet: None,
            naming: None,
            text_encoders,
        };
    }
    let mut best: Option<(Layout, Naming, usize)> = None;
    for layout in LAYOUTS {
        for &naming in layout.namings() {
            let specs: BTreeMap<String, ModuleSpec> = layout
                .modules_named(naming)
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect();
            let mut matched = 0;
            let mut conflict = false;
            for (name, m) in &model {
                if let Some(spec) = specs.get(*name) {
                    if spec.kind == m.kind && spec.out_dim == m.out_dim && spec.in_dim == m.in_dim {
                        matched += 1;
                    } else {
                        conflict = true;
                    }
                }
            }
            if !conflict && matched > 0 && best.is_none_or(|(_, _, b)| matched > b) {
                best = Some((layout, naming, matched));
            }
        }
    }
    LayoutReport {
        unet: Some(best.map_or(UnetLayout::Unknown, |(l, _, _)| UnetLayout::Known(l))),
        naming: best.map(|(_, n, _)| n),
        text_encoders,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_counts_match_the_architectures() {
        let cases = [
            (Layout::Sd1, 192),
            (Layout::Sdxl, 722),
            (Layout::Tiny, 38),
            (Layout::Flux, 314),
            (Layout::Sd35Large, 384),
            (Layout::Sd35Medium, 270),
        ];
        for (layout, want) in cases {
            let modules = layout.modules();
            assert_eq!(modules.len(), want, "{layout:?}");
            let mut names: Vec<_> = modules.iter().map(|m| &m.name).collect();
            names.dedup();
            assert_eq!(names.len(), want, "{layout:?} has duplicate names");
        }
    }

    #[test]
    fn known_module_shapes() {
        let find = |layout: Layout, name: &str| {
            layout
                .modules()
                .into_iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        let conv1 = ModuleKind::Conv { kh: 1, kw: 1 };
        let cases = [
            (
                Layout::Sd1,
                "lora_unet_down_blocks_0_attentions_0_proj_in",
                conv1,
                320,
                320,
            ),
            (
                Layout::Sd1,
                "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k",
                ModuleKind::Linear,
                1280,
                768,
            ),
            (
                Layout::Sd1,
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                ModuleKind::Linear,
                10240,
                1280,
            ),
            (
                Layout::Sdxl,
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v",
                ModuleKind::Linear,
                640,
                2048,
            ),
            (
                Layout::Sdxl,
                "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                ModuleKind::Linear,
                1280,
                5120,
            ),
            (
                Layout::Sdxl,
                "lora_unet_output_blocks_5_1_proj_out",
                ModuleKind::Linear,
                640,
                640,
            ),
        ];
        for (layout, name, kind, out_dim, in_dim) in cases {
            let m = find(layout, name);
            assert_eq!(
                (m.kind, m.out_dim, m.in_dim),
                (kind, out_dim, in_dim),
                "{name}"
            );
        }
    }

    #[test]
    fn detects_each_synthetic_layout() {
        for layout in [Layout::Sd1, Layout::Sdxl, Layout::Tiny] {
            let lora = crate::synth::random_lora(layout, 1, 1.0, 7);
            let report = detect(&lora);
            assert_eq!(report.known(), Some(layout));
            assert_eq!(report.naming, Some(Naming::Kohya));
            assert!(report.text_encoders.is_empty());
        }
    }

    #[test]
    fn detects_transformer_layouts_in_every_naming_from_a_few_modules() {
        for layout in [Layout::Flux, Layout::Sd35Large, Layout::Sd35Medium] {
            for &naming in layout.namings() {
                // A sample of the modules (every 25th) is enough, with a text encoder kept.
                let mut lora = crate::synth::sampled_lora(layout, naming, 25, 1, 3);
                let te = lora.modules.values().next().cloned().expect("modules");
                lora.modules
                    .insert("lora_te1_text_model_encoder_layers_0_mlp_fc1".into(), te);
                let report = detect(&lora);
                assert_eq!(report.known(), Some(layout), "{layout:?} {naming:?}");
                assert_eq!(report.naming, Some(naming), "{layout:?} {naming:?}");
                assert_eq!(report.text_encoders, ["te1"]);
                assert!(report.describe().contains(naming.label()));
            }
        }
    }

    #[test]
    fn a_shape_conflict_makes_the_layout_unknown() {
        let mut lora = crate::synth::random_lora(Layout::Tiny, 2, 1.0, 1);
        let m = lora.modules.values_mut().next().expect("modules");
        m.out_dim += 1;
        m.up.extend(std::iter::repeat_n(0.0, m.rank));
        assert_eq!(detect(&lora).unet, Some(UnetLayout::Unknown));
    }
}

//! Every linear and conv layer of the SD1.x and SDXL UNets and their CLIP text encoders,
//! with its weight shape and its name in both spellings loaders use: the original (LDM /
//! sgm, `input_blocks.4.1...`, as in single-file checkpoints) and diffusers'
//! (`down_blocks.1.attentions.0...`). Built from the architectures' configs the way
//! diffusers' `UNet2DConditionModel` builds its blocks (channels, skip connections,
//! transformer depths), so a LoCon's ResNet convs are layers too.

use std::collections::BTreeMap;

/// One layer: its LDM path, its diffusers path (if diffusers has it) and its weight shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnetLayer {
    pub ldm: String,
    pub diffusers: String,
    pub shape: Vec<usize>,
}

/// A UNet's configuration: what differs between SD1.x, SDXL and the smaller UNets of the
/// same family (read from a checkpoint by [`infer_config`]).
pub(crate) struct UnetConfig {
    channels: Vec<usize>,
    /// Transformer depth per level (0 = no attention at that level).
    depth: Vec<usize>,
    mid_depth: usize,
    context: usize,
    /// SDXL's linear `proj_in` / `proj_out` (SD1.x uses 1x1 convs).
    linear_proj: bool,
    /// SDXL's added-conditioning embedding input width.
    adm_in: Option<usize>,
    /// ResNets per down level (diffusers' `layers_per_block`); up levels have one more.
    res_per_level: usize,
}

fn sd1() -> UnetConfig {
    UnetConfig {
        channels: vec![320, 640, 1280, 1280],
        depth: vec![1, 1, 1, 0],
        mid_depth: 1,
        context: 768,
        linear_proj: false,
        adm_in: None,
        res_per_level: 2,
    }
}

fn sdxl() -> UnetConfig {
    UnetConfig {
        channels: vec![320, 640, 1280],
        depth: vec![0, 2, 10],
        mid_depth: 10,
        context: 2048,
        linear_proj: true,
        adm_in: Some(2816),
        res_per_level: 2,
    }
}

/// The configuration of the UNet whose weights (`model.diffusion_model.<LDM path>.weight`
/// -> shape) are given: levels and ResNets per level from where the downsamplers sit,
/// widths from each level's first ResNet, transformer depths from the blocks present.
/// What the weights do not show is taken from SD1.x (`sdxl == false`) or SDXL.
pub(crate) fn infer_config(weights: &BTreeMap<&str, &[usize]>, sdxl: bool) -> UnetConfig {
    let mut cfg = if sdxl { self::sdxl() } else { sd1() };
    let shape = |key: &str| {
        weights
            .get(format!("model.diffusion_model.{key}").as_str())
            .copied()
    };
    let blocks_under = |prefix: &str| -> usize {
        let prefix = format!("model.diffusion_model.{prefix}.transformer_blocks.");
        weights
            .keys()
            .filter_map(|k| k.strip_prefix(prefix.as_str()))
            .filter_map(|rest| rest.split_once('.'))
            .filter_map(|(b, _)| b.parse::<usize>().ok())
            .map(|b| b + 1)
            .max()
            .unwrap_or(0)
    };
    let ops: Vec<usize> = weights
        .keys()
        .filter_map(|k| k.strip_prefix("model.diffusion_model.input_blocks."))
        .filter_map(|rest| rest.strip_suffix(".0.op.weight"))
        .filter_map(|i| i.parse().ok())
        .collect::<std::collections::BTreeSet<usize>>()
        .into_iter()
        .collect();
    let Some(&first_op) = ops.first() else {
        return cfg;
    };
    let n = first_op.saturating_sub(1).max(1);
    let levels = ops.len() + 1;
    let mut channels = Vec::with_capacity(levels);
    let mut depth = Vec::with_capacity(levels);
    for level in 0..levels {
        let first = 1 + (n + 1) * level;
        match shape(&format!("input_blocks.{first}.0.out_layers.3.weight")).and_then(|s| s.first())
        {
            Some(&c) => channels.push(c),
            None => return cfg,
        }
        depth.push(blocks_under(&format!("input_blocks.{first}.1")));
    }
    cfg.channels = channels;
    cfg.depth = depth;
    cfg.res_per_level = n;
    cfg.mid_depth = blocks_under("middle_block.1");
    if let Some((k, s)) = weights
        .iter()
        .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
        && k.starts_with("model.diffusion_model.")
        && let Some(&ctx) = s.get(1)
    {
        cfg.context = ctx;
    }
    if let Some((_, s)) = weights
        .iter()
        .find(|(k, _)| k.starts_with("model.diffusion_model.") && k.ends_with("proj_in.weight"))
    {
        cfg.linear_proj = s.len() == 2;
    }
    cfg.adm_in = shape("label_emb.0.0.weight")
        .and_then(|s| s.get(1))
        .copied();
    cfg
}

/// The UNet layers of SD1.x (`sdxl == false`) or SDXL.
pub(crate) fn unet_layers(sdxl: bool) -> Vec<UnetLayer> {
    unet_layers_of(&if sdxl { self::sdxl() } else { sd1() })
}

/// The UNet layers of the configuration `cfg`.
pub(crate) fn unet_layers_of(cfg: &UnetConfig) -> Vec<UnetLayer> {
    let n = cfg.res_per_level;
    let mut out = Builder::default();
    let c0 = cfg.channels.first().copied().unwrap_or(320);
    let temb = 4 * c0;
    out.conv("input_blocks.0.0", "conv_in", c0, 4, 3);
    out.linear("time_embed.0", "time_embedding.linear_1", temb, c0);
    out.linear("time_embed.2", "time_embedding.linear_2", temb, temb);
    if let Some(adm) = cfg.adm_in {
        out.linear("label_emb.0.0", "add_embedding.linear_1", temb, adm);
        out.linear("label_emb.0.2", "add_embedding.linear_2", temb, temb);
    }
    let levels = cfg.channels.len();
    let mut skips = vec![c0];
    let mut ch = c0;
    for (level, (&c, &depth)) in cfg.channels.iter().zip(&cfg.depth).enumerate() {
        for j in 0..n {
            let ldm = format!("input_blocks.{}", 1 + (n + 1) * level + j);
            let dif = format!("down_blocks.{level}");
            out.resnet(
                &format!("{ldm}.0"),
                &format!("{dif}.resnets.{j}"),
                ch,
                c,
                temb,
            );
            ch = c;
            if depth > 0 {
                out.transformer(
                    &format!("{ldm}.1"),
                    &format!("{dif}.attentions.{j}"),
                    c,
                    depth,
                    cfg,
                );
            }
            skips.push(c);
        }
        if level + 1 < levels {
            out.conv(
                &format!("input_blocks.{}.0.op", 1 + (n + 1) * level + n),
                &format!("down_blocks.{level}.downsamplers.0.conv"),
                c,
                c,
                3,
            );
            skips.push(c);
        }
    }
    out.resnet("middle_block.0", "mid_block.resnets.0", ch, ch, temb);
    out.transformer(
        "middle_block.1",
        "mid_block.attentions.0",
        ch,
        cfg.mid_depth,
        cfg,
    );
    out.resnet("middle_block.2", "mid_block.resnets.1", ch, ch, temb);
    for up in 0..levels {
        let level = levels - 1 - up;
        let c = cfg.channels.get(level).copied().unwrap_or(c0);
        let depth = cfg.depth.get(level).copied().unwrap_or(0);
        for j in 0..=n {
            let skip = skips.pop().unwrap_or(c);
            let ldm = format!("output_blocks.{}", (n + 1) * up + j);
            let dif = format!("up_blocks.{up}");
            out.resnet(
                &format!("{ldm}.0"),
                &format!("{dif}.resnets.{j}"),
                ch + skip,
                c,
                temb,
            );
            ch = c;
            if depth > 0 {
                out.transformer(
                    &format!("{ldm}.1"),
                    &format!("{dif}.attentions.{j}"),
                    c,
                    depth,
                    cfg,
                );
            }
        }
        if up + 1 < levels {
            let index = if depth > 0 { 2 } else { 1 };
            out.conv(
                &format!("output_blocks.{}.{index}.conv", (n + 1) * up + n),
                &format!("up_blocks.{up}.upsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
    }
    out.conv("out.2", "conv_out", 4, c0, 3);
    out.0
}

#[derive(Default)]
struct Builder(Vec<UnetLayer>);

impl Builder {
    fn push(&mut self, ldm: &str, diffusers: &str, shape: Vec<usize>) {
        self.0.push(UnetLayer {
            ldm: ldm.into(),
            diffusers: diffusers.into(),
            shape,
        });
    }

    fn linear(&mut self, ldm: &str, diffusers: &str, out: usize, inp: usize) {
        self.push(ldm, diffusers, vec![out, inp]);
    }

    fn conv(&mut self, ldm: &str, diffusers: &str, out: usize, inp: usize, k: usize) {
        self.push(ldm, diffusers, vec![out, inp, k, k]);
    }

    fn resnet(&mut self, ldm: &str, dif: &str, inp: usize, out: usize, temb: usize) {
        self.conv(
            &format!("{ldm}.in_layers.2"),
            &format!("{dif}.conv1"),
            out,
            inp,
            3,
        );
        self.linear(
            &format!("{ldm}.emb_layers.1"),
            &format!("{dif}.time_emb_proj"),
            out,
            temb,
        );
        self.conv(
            &format!("{ldm}.out_layers.3"),
            &format!("{dif}.conv2"),
            out,
            out,
            3,
        );
        if inp != out {
            self.conv(
                &format!("{ldm}.skip_connection"),
                &format!("{dif}.conv_shortcut"),
                out,
                inp,
                1,
            );
        }
    }

    fn transformer(&mut self, ldm: &str, dif: &str, c: usize, depth: usize, cfg: &UnetConfig) {
        for p in ["proj_in", "proj_out"] {
            let (l, d) = (format!("{ldm}.{p}"), format!("{dif}.{p}"));
            if cfg.linear_proj {
                self.linear(&l, &d, c, c);
            } else {
                self.conv(&l, &d, c, c, 1);
            }
        }
        for b in 0..depth {
            let block = format!("transformer_blocks.{b}");
            let mut lin = |name: &str, out: usize, inp: usize| {
                self.linear(
                    &format!("{ldm}.{block}.{name}"),
                    &format!("{dif}.{block}.{name}"),
                    out,
                    inp,
                )
            };
            for attn in ["attn1", "attn2"] {
                let kv = if attn == "attn1" { c } else { cfg.context };
                lin(&format!("{attn}.to_q"), c, c);
                lin(&format!("{attn}.to_k"), c, kv);
                lin(&format!("{attn}.to_v"), c, kv);
                lin(&format!("{attn}.to_out.0"), c, c);
            }
            lin("ff.net.0.proj", 8 * c, c);
            lin("ff.net.2", c, 4 * c);
        }
    }
}

/// A CLIP text encoder: layers, width and MLP width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Clip {
    pub layers: usize,
    pub width: usize,
    pub mlp: usize,
}

/// CLIP ViT-L/14 (SD1.x's encoder, SDXL's first).
pub(crate) const CLIP_L: Clip = Clip {
    layers: 12,
    width: 768,
    mlp: 3072,
};

/// OpenCLIP ViT-bigG/14 (SDXL's second encoder).
pub(crate) const CLIP_G: Clip = Clip {
    layers: 32,
    width: 1280,
    mlp: 5120,
};

/// The six layers LoRA trainers adapt per CLIP encoder layer, as `(HF suffix, out, in)`.
pub(crate) fn clip_layers(clip: Clip) -> Vec<(String, Vec<usize>)> {
    let (w, m) = (clip.width, clip.mlp);
    let mut v = Vec::new();
    for i in 0..clip.layers {
        let p = format!("text_model.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            v.push((format!("{p}.self_attn.{proj}"), vec![w, w]));
        }
        v.push((format!("{p}.mlp.fc1"), vec![m, w]));
        v.push((format!("{p}.mlp.fc2"), vec![w, m]));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;
    use crate::module::ModuleKind;

    /// The attention modules of our LoRA layouts are layers of these tables, in the
    /// naming kohya writes (diffusers paths for SD1.x, LDM paths for SDXL), same shape.
    #[test]
    fn lora_layouts_are_layers_of_the_unet_tables() {
        for (layout, sdxl) in [(Layout::Sd1, false), (Layout::Sdxl, true)] {
            let layers = unet_layers(sdxl);
            for spec in layout.modules() {
                let found = layers.iter().find(|l| {
                    let path = if sdxl { &l.ldm } else { &l.diffusers };
                    format!("lora_unet_{}", path.replace('.', "_")) == spec.name
                });
                let layer = found.unwrap_or_else(|| panic!("{} not a layer", spec.name));
                let want = match spec.kind {
                    ModuleKind::Linear => vec![spec.out_dim, spec.in_dim],
                    ModuleKind::Conv { kh, kw } => vec![spec.out_dim, spec.in_dim, kh, kw],
                };
                assert_eq!(layer.shape, want, "{}", spec.name);
            }
        }
    }

    #[test]
    fn known_resnet_and_sampler_shapes() {
        let find = |sdxl: bool, ldm: &str| {
            unet_layers(sdxl)
                .into_iter()
                .find(|l| l.ldm == ldm)
                .unwrap_or_else(|| panic!("{ldm} missing"))
        };
        let cases: [(bool, &str, &str, &[usize]); 8] = [
            (
                false,
                "input_blocks.4.0.in_layers.2",
                "down_blocks.1.resnets.0.conv1",
                &[640, 320, 3, 3],
            ),
            (
                false,
                "input_blocks.4.0.skip_connection",
                "down_blocks.1.resnets.0.conv_shortcut",
                &[640, 320, 1, 1],
            ),
            (
                false,
                "output_blocks.2.1.conv",
                "up_blocks.0.upsamplers.0.conv",
                &[1280, 1280, 3, 3],
            ),
            (
                false,
                "output_blocks.3.0.in_layers.2",
                "up_blocks.1.resnets.0.conv1",
                &[1280, 2560, 3, 3],
            ),
            (
                false,
                "output_blocks.11.0.skip_connection",
                "up_blocks.3.resnets.2.conv_shortcut",
                &[320, 640, 1, 1],
            ),
            (
                true,
                "output_blocks.2.2.conv",
                "up_blocks.0.upsamplers.0.conv",
                &[1280, 1280, 3, 3],
            ),
            (
                true,
                "label_emb.0.0",
                "add_embedding.linear_1",
                &[1280, 2816],
            ),
            (
                true,
                "output_blocks.6.0.in_layers.2",
                "up_blocks.2.resnets.0.conv1",
                &[320, 960, 3, 3],
            ),
        ];
        for (sdxl, ldm, diffusers, shape) in cases {
            let l = find(sdxl, ldm);
            assert_eq!(
                (l.diffusers.as_str(), l.shape.as_slice()),
                (diffusers, shape),
                "{ldm}"
            );
        }
    }
}

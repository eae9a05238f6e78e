//! The adaptable linear layers of the FLUX.1 and SD3.5 (MMDiT) transformers, derived from
//! their architectures, and how each is named in the three layouts LoRA files use:
//! kohya (`lora_unet_` + the original module path with `_`), ComfyUI (`diffusion_model.` +
//! the original dotted path) and diffusers / ai-toolkit (`transformer.` + diffusers' path,
//! with q, k, v — and in FLUX.1's single blocks the MLP input — as separate layers).
//!
//! The original (BFL / SAI) layers fuse what diffusers splits: FLUX.1's `img_attn.qkv` is
//! diffusers' `attn.to_q`, `to_k`, `to_v` stacked by rows; a single block's `linear1` is
//! `to_q`, `to_k`, `to_v`, `proj_mlp`. The final adaLN modulation stores (shift, scale) in the
//! original and (scale, shift) in diffusers: its rows are swapped by halves. The mappings are
//! the ones ComfyUI's `flux_to_diffusers` / `mmdit_to_diffusers` and diffusers' conversion
//! scripts apply.

/// A LoRA naming convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Naming {
    /// `lora_unet_double_blocks_0_img_attn_qkv`, `lora_down`/`lora_up`/`alpha`.
    Kohya,
    /// `transformer.transformer_blocks.0.attn.to_q`, `lora_A`/`lora_B`, no alpha.
    Diffusers,
    /// `diffusion_model.double_blocks.0.img_attn.qkv`, `lora_down`/`lora_up`/`alpha`.
    ComfyUi,
}

impl Naming {
    pub fn label(self) -> &'static str {
        match self {
            Naming::Kohya => "kohya",
            Naming::Diffusers => "diffusers",
            Naming::ComfyUi => "comfyui",
        }
    }

    /// The naming a module name is written in (text-encoder and unknown names: `None`).
    pub fn of(name: &str) -> Option<Naming> {
        if name.starts_with("lora_unet_") {
            Some(Naming::Kohya)
        } else if name.starts_with("diffusion_model.") {
            Some(Naming::ComfyUi)
        } else if name.starts_with("transformer.") {
            Some(Naming::Diffusers)
        } else {
            None
        }
    }
}

impl std::str::FromStr for Naming {
    type Err = crate::LoraError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "kohya" => Ok(Naming::Kohya),
            "diffusers" | "ai-toolkit" | "peft" => Ok(Naming::Diffusers),
            "comfyui" | "comfy" => Ok(Naming::ComfyUi),
            other => Err(crate::LoraError::InvalidArgument(format!(
                "unknown layout `{other}` (expected kohya, diffusers or comfyui)"
            ))),
        }
    }
}

/// One diffusers layer of an original layer: its path and how many of the original's
/// output rows it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub path: String,
    pub rows: usize,
}

/// One original (BFL / SAI) linear layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The original dotted path, e.g. `double_blocks.0.img_attn.qkv`.
    pub path: String,
    pub out_dim: usize,
    pub in_dim: usize,
    /// The diffusers layers in row order; one part when the layer is not fused.
    pub parts: Vec<Part>,
    /// Diffusers stores the two halves of the rows swapped (final adaLN modulation).
    pub swap_halves: bool,
}

impl Layer {
    /// The kohya name of the layer.
    pub fn kohya_name(&self) -> String {
        format!("lora_unet_{}", self.path.replace('.', "_"))
    }

    /// The ComfyUI name of the layer.
    pub fn comfyui_name(&self) -> String {
        format!("diffusion_model.{}", self.path)
    }

    /// The diffusers names of its parts.
    pub fn diffusers_names(&self) -> Vec<String> {
        self.parts
            .iter()
            .map(|p| format!("transformer.{}", p.path))
            .collect()
    }

    /// The first row of each part.
    pub fn part_offsets(&self) -> Vec<usize> {
        let mut at = 0;
        self.parts
            .iter()
            .map(|p| {
                let o = at;
                at += p.rows;
                o
            })
            .collect()
    }
}

/// The transformer models we know the layers of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Model {
    /// FLUX.1 dev / schnell: 19 double blocks, 38 single blocks, width 3072.
    Flux,
    /// SD3.5 Large: 38 joint blocks, width 2432.
    Sd35Large,
    /// SD3.5 Medium (MMDiT-X): 24 joint blocks, width 1536, a second attention in the
    /// image stream of blocks 0-12.
    Sd35Medium,
}

struct Builder(Vec<Layer>);

impl Builder {
    fn layer(&mut self, path: String, out_dim: usize, in_dim: usize, diffusers: String) {
        self.0.push(Layer {
            path,
            out_dim,
            in_dim,
            parts: vec![Part {
                path: diffusers,
                rows: out_dim,
            }],
            swap_halves: false,
        });
    }

    fn fused(&mut self, path: String, in_dim: usize, parts: Vec<(String, usize)>) {
        let parts: Vec<Part> = parts
            .into_iter()
            .map(|(path, rows)| Part { path, rows })
            .collect();
        self.0.push(Layer {
            path,
            out_dim: parts.iter().map(|p| p.rows).sum(),
            in_dim,
            parts,
            swap_halves: false,
        });
    }

    fn swapped(&mut self, path: String, out_dim: usize, in_dim: usize, diffusers: String) {
        self.layer(path, out_dim, in_dim, diffusers);
        if let Some(l) = self.0.last_mut() {
            l.swap_halves = true;
        }
    }

    /// q, k, v of width `h` as diffusers' three layers `{prefix}{q}`, `{k}`, `{v}`.
    fn qkv(prefix: &str, names: [&str; 3], h: usize) -> Vec<(String, usize)> {
        names.iter().map(|n| (format!("{prefix}{n}"), h)).collect()
    }
}

impl Model {
    pub fn label(self) -> &'static str {
        match self {
            Model::Flux => "FLUX.1 transformer",
            Model::Sd35Large => "SD3.5 Large MMDiT",
            Model::Sd35Medium => "SD3.5 Medium MMDiT",
        }
    }

    /// Every linear layer a LoRA may adapt, in a fixed order.
    pub fn layers(self) -> Vec<Layer> {
        match self {
            Model::Flux => flux(),
            Model::Sd35Large => mmdit(38, &[]),
            Model::Sd35Medium => mmdit(24, &(0..=12).collect::<Vec<_>>()),
        }
    }
}

fn flux() -> Vec<Layer> {
    let h = 3072;
    let mlp = 4 * h;
    let mut b = Builder(Vec::new());
    for i in 0..19 {
        let (o, d) = (
            format!("double_blocks.{i}"),
            format!("transformer_blocks.{i}"),
        );
        let attn = format!("{d}.attn.");
        b.fused(
            format!("{o}.img_attn.qkv"),
            h,
            Builder::qkv(&attn, ["to_q", "to_k", "to_v"], h),
        );
        b.fused(
            format!("{o}.txt_attn.qkv"),
            h,
            Builder::qkv(&attn, ["add_q_proj", "add_k_proj", "add_v_proj"], h),
        );
        b.layer(
            format!("{o}.img_attn.proj"),
            h,
            h,
            format!("{d}.attn.to_out.0"),
        );
        b.layer(
            format!("{o}.txt_attn.proj"),
            h,
            h,
            format!("{d}.attn.to_add_out"),
        );
        b.layer(
            format!("{o}.img_mlp.0"),
            mlp,
            h,
            format!("{d}.ff.net.0.proj"),
        );
        b.layer(format!("{o}.img_mlp.2"), h, mlp, format!("{d}.ff.net.2"));
        b.layer(
            format!("{o}.txt_mlp.0"),
            mlp,
            h,
            format!("{d}.ff_context.net.0.proj"),
        );
        b.layer(
            format!("{o}.txt_mlp.2"),
            h,
            mlp,
            format!("{d}.ff_context.net.2"),
        );
        b.layer(
            format!("{o}.img_mod.lin"),
            6 * h,
            h,
            format!("{d}.norm1.linear"),
        );
        b.layer(
            format!("{o}.txt_mod.lin"),
            6 * h,
            h,
            format!("{d}.norm1_context.linear"),
        );
    }
    for i in 0..38 {
        let (o, d) = (
            format!("single_blocks.{i}"),
            format!("single_transformer_blocks.{i}"),
        );
        let mut parts = Builder::qkv(&format!("{d}.attn."), ["to_q", "to_k", "to_v"], h);
        parts.push((format!("{d}.proj_mlp"), mlp));
        b.fused(format!("{o}.linear1"), h, parts);
        b.layer(format!("{o}.linear2"), h, h + mlp, format!("{d}.proj_out"));
        b.layer(
            format!("{o}.modulation.lin"),
            3 * h,
            h,
            format!("{d}.norm.linear"),
        );
    }
    let t = "time_text_embed";
    for (o, d, in_dim) in [
        ("img_in", "x_embedder".to_string(), 64),
        ("txt_in", "context_embedder".to_string(), 4096),
        (
            "time_in.in_layer",
            format!("{t}.timestep_embedder.linear_1"),
            256,
        ),
        (
            "time_in.out_layer",
            format!("{t}.timestep_embedder.linear_2"),
            h,
        ),
        (
            "vector_in.in_layer",
            format!("{t}.text_embedder.linear_1"),
            768,
        ),
        (
            "vector_in.out_layer",
            format!("{t}.text_embedder.linear_2"),
            h,
        ),
        (
            "guidance_in.in_layer",
            format!("{t}.guidance_embedder.linear_1"),
            256,
        ),
        (
            "guidance_in.out_layer",
            format!("{t}.guidance_embedder.linear_2"),
            h,
        ),
    ] {
        b.layer(o.into(), h, in_dim, d);
    }
    b.layer("final_layer.linear".into(), 64, h, "proj_out".into());
    b.swapped(
        "final_layer.adaLN_modulation.1".into(),
        2 * h,
        h,
        "norm_out.linear".into(),
    );
    b.0
}

/// SD3-family MMDiT with `depth` joint blocks (width 64 x depth); `dual` lists the blocks
/// with a second image-stream attention (SD3.5 Medium). The last block's context stream is
/// "pre-only": no output projection or MLP, and a (shift, scale)-only modulation that
/// diffusers stores swapped.
fn mmdit(depth: usize, dual: &[usize]) -> Vec<Layer> {
    let h = 64 * depth;
    let mlp = 4 * h;
    let mut b = Builder(Vec::new());
    for i in 0..depth {
        let (o, d) = (
            format!("joint_blocks.{i}"),
            format!("transformer_blocks.{i}"),
        );
        let last = i + 1 == depth;
        let attn = format!("{d}.attn.");
        b.fused(
            format!("{o}.x_block.attn.qkv"),
            h,
            Builder::qkv(&attn, ["to_q", "to_k", "to_v"], h),
        );
        b.layer(
            format!("{o}.x_block.attn.proj"),
            h,
            h,
            format!("{d}.attn.to_out.0"),
        );
        b.layer(
            format!("{o}.x_block.mlp.fc1"),
            mlp,
            h,
            format!("{d}.ff.net.0.proj"),
        );
        b.layer(
            format!("{o}.x_block.mlp.fc2"),
            h,
            mlp,
            format!("{d}.ff.net.2"),
        );
        let x_mod = if dual.contains(&i) { 9 * h } else { 6 * h };
        b.layer(
            format!("{o}.x_block.adaLN_modulation.1"),
            x_mod,
            h,
            format!("{d}.norm1.linear"),
        );
        if dual.contains(&i) {
            b.fused(
                format!("{o}.x_block.attn2.qkv"),
                h,
                Builder::qkv(&format!("{d}.attn2."), ["to_q", "to_k", "to_v"], h),
            );
            b.layer(
                format!("{o}.x_block.attn2.proj"),
                h,
                h,
                format!("{d}.attn2.to_out.0"),
            );
        }
        b.fused(
            format!("{o}.context_block.attn.qkv"),
            h,
            Builder::qkv(&attn, ["add_q_proj", "add_k_proj", "add_v_proj"], h),
        );
        let c_mod = format!("{o}.context_block.adaLN_modulation.1");
        if last {
            b.swapped(c_mod, 2 * h, h, format!("{d}.norm1_context.linear"));
        } else {
            b.layer(c_mod, 6 * h, h, format!("{d}.norm1_context.linear"));
            b.layer(
                format!("{o}.context_block.attn.proj"),
                h,
                h,
                format!("{d}.attn.to_add_out"),
            );
            b.layer(
                format!("{o}.context_block.mlp.fc1"),
                mlp,
                h,
                format!("{d}.ff_context.net.0.proj"),
            );
            b.layer(
                format!("{o}.context_block.mlp.fc2"),
                h,
                mlp,
                format!("{d}.ff_context.net.2"),
            );
        }
    }
    let t = "time_text_embed";
    for (o, d, in_dim) in [
        ("context_embedder", "context_embedder".to_string(), 4096),
        (
            "t_embedder.mlp.0",
            format!("{t}.timestep_embedder.linear_1"),
            256,
        ),
        (
            "t_embedder.mlp.2",
            format!("{t}.timestep_embedder.linear_2"),
            h,
        ),
        (
            "y_embedder.mlp.0",
            format!("{t}.text_embedder.linear_1"),
            2048,
        ),
        ("y_embedder.mlp.2", format!("{t}.text_embedder.linear_2"), h),
    ] {
        b.layer(o.into(), h, in_dim, d);
    }
    b.layer("final_layer.linear".into(), 64, h, "proj_out".into());
    b.swapped(
        "final_layer.adaLN_modulation.1".into(),
        2 * h,
        h,
        "norm_out.linear".into(),
    );
    b.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_counts_and_shapes_follow_the_architectures() {
        // FLUX.1: 19 double blocks x 10 + 38 single x 3 + 8 embedders + 2 final = 314.
        // SD3.5 Large: 37 full blocks x 10 + the pre-only last block's 7 + 5 embedders +
        // 2 final. SD3.5 Medium: 23 x 10 + 7 + 13 dual blocks x 2 + 7.
        let cases = [
            (Model::Flux, 314, 19 * 2 * 3 + 38 * 4),
            (Model::Sd35Large, 37 * 10 + 7 + 7, 38 * 2 * 3),
            (
                Model::Sd35Medium,
                23 * 10 + 7 + 13 * 2 + 7,
                24 * 2 * 3 + 13 * 3,
            ),
        ];
        for (model, layers, fused_parts) in cases {
            let l = model.layers();
            assert_eq!(l.len(), layers, "{model:?}");
            let parts: usize = l
                .iter()
                .filter(|l| l.parts.len() > 1)
                .map(|l| l.parts.len())
                .sum();
            assert_eq!(parts, fused_parts, "{model:?}");
            for layer in &l {
                let rows: usize = layer.parts.iter().map(|p| p.rows).sum();
                assert_eq!(rows, layer.out_dim, "{}", layer.path);
            }
            let mut names: Vec<String> = l.iter().flat_map(|l| l.diffusers_names()).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), l.iter().map(|l| l.parts.len()).sum::<usize>());
        }
        let find = |model: Model, path: &str| {
            model
                .layers()
                .into_iter()
                .find(|l| l.path == path)
                .unwrap_or_else(|| panic!("{path}"))
        };
        let shapes = [
            (Model::Flux, "double_blocks.3.img_attn.qkv", 9216, 3072),
            (Model::Flux, "double_blocks.18.txt_mod.lin", 18432, 3072),
            (Model::Flux, "single_blocks.37.linear1", 21504, 3072),
            (Model::Flux, "single_blocks.0.linear2", 3072, 15360),
            (Model::Flux, "single_blocks.5.modulation.lin", 9216, 3072),
            (Model::Flux, "txt_in", 3072, 4096),
            (
                Model::Sd35Large,
                "joint_blocks.0.x_block.attn.qkv",
                7296,
                2432,
            ),
            (
                Model::Sd35Large,
                "joint_blocks.37.context_block.adaLN_modulation.1",
                4864,
                2432,
            ),
            (
                Model::Sd35Medium,
                "joint_blocks.12.x_block.adaLN_modulation.1",
                13824,
                1536,
            ),
            (
                Model::Sd35Medium,
                "joint_blocks.13.x_block.adaLN_modulation.1",
                9216,
                1536,
            ),
        ];
        for (model, path, out_dim, in_dim) in shapes {
            let l = find(model, path);
            assert_eq!((l.out_dim, l.in_dim), (out_dim, in_dim), "{path}");
        }
        let l = find(Model::Flux, "single_blocks.2.linear1");
        assert_eq!(l.kohya_name(), "lora_unet_single_blocks_2_linear1");
        assert_eq!(
            l.diffusers_names(),
            [
                "transformer.single_transformer_blocks.2.attn.to_q",
                "transformer.single_transformer_blocks.2.attn.to_k",
                "transformer.single_transformer_blocks.2.attn.to_v",
                "transformer.single_transformer_blocks.2.proj_mlp",
            ]
        );
        assert_eq!(l.part_offsets(), [0, 3072, 6144, 9216]);
        let last = find(
            Model::Sd35Large,
            "joint_blocks.37.context_block.adaLN_modulation.1",
        );
        assert!(last.swap_halves);
        assert!(
            !Model::Sd35Large
                .layers()
                .iter()
                .any(|l| l.path == "joint_blocks.37.context_block.mlp.fc1")
        );
    }
}

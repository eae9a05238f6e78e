//! The kohya names of an SD1-family UNet's modules: which LDM paths LoRA and LoCon adapt,
//! and their diffusers paths (`lora_unet_<diffusers path with _>`), for any number of
//! ResNets per level. One table for the trainer (`slider-models`) and the checkpoint baker
//! (`slider-bake`).

/// Whether a module path is one of the ResNet-block or sampler modules LoCon adds.
pub fn is_locon_module(path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').collect();
    matches!(
        parts.as_slice(),
        [.., "in_layers", "2"]
            | [.., "out_layers", "3"]
            | [.., "emb_layers", "1"]
            | [.., "skip_connection"]
            | ["input_blocks", _, "0", "op"]
            | ["output_blocks", _, _, "conv"]
    )
}

/// The diffusers path of a ResNet block's or sampler's module (see [`diffusers_path`] for the
/// block numbering): `input_blocks.N.0.in_layers.2` is `down_blocks.{level}.resnets.{i}.conv1`
/// (`out_layers.3` `conv2`, `emb_layers.1` `time_emb_proj`, `skip_connection`
/// `conv_shortcut`), `input_blocks.N.0.op` `down_blocks.{level}.downsamplers.0.conv`,
/// `middle_block.{0,2}` `mid_block.resnets.{0,1}`, `output_blocks.N.M.conv`
/// `up_blocks.{level}.upsamplers.0.conv`.
pub fn diffusers_resnet_path(path: &str, per_level: usize) -> Option<String> {
    let leaf = |rest: &[&str]| match rest {
        ["in_layers", "2"] => Some("conv1"),
        ["out_layers", "3"] => Some("conv2"),
        ["emb_layers", "1"] => Some("time_emb_proj"),
        ["skip_connection"] => Some("conv_shortcut"),
        _ => None,
    };
    let parts: Vec<&str> = path.split('.').collect();
    match parts.as_slice() {
        ["input_blocks", n, "0", "op"] => {
            let p = n.parse::<usize>().ok()?.checked_sub(1)?;
            Some(format!("down_blocks.{}.downsamplers.0.conv", p / per_level))
        }
        ["input_blocks", n, "0", rest @ ..] => {
            let p = n.parse::<usize>().ok()?.checked_sub(1)?;
            let (level, i) = (p / per_level, p % per_level);
            Some(format!("down_blocks.{level}.resnets.{i}.{}", leaf(rest)?))
        }
        ["middle_block", m, rest @ ..] => {
            let i = match *m {
                "0" => 0,
                "2" => 1,
                _ => return None,
            };
            Some(format!("mid_block.resnets.{i}.{}", leaf(rest)?))
        }
        ["output_blocks", n, _, "conv"] => {
            let n = n.parse::<usize>().ok()?;
            Some(format!("up_blocks.{}.upsamplers.0.conv", n / per_level))
        }
        ["output_blocks", n, "0", rest @ ..] => {
            let n = n.parse::<usize>().ok()?;
            let (level, i) = (n / per_level, n % per_level);
            Some(format!("up_blocks.{level}.resnets.{i}.{}", leaf(rest)?))
        }
        _ => None,
    }
}

/// Whether a module path inside the UNet is one of kohya's targets.
pub fn is_transformer_module(path: &str) -> bool {
    const BLOCK_LEAVES: [&str; 10] = [
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    ];
    if path.contains(".transformer_blocks.") {
        return BLOCK_LEAVES.iter().any(|leaf| path.ends_with(leaf));
    }
    path.ends_with(".proj_in") || path.ends_with(".proj_out")
}

/// The diffusers path of a spatial transformer's module: `input_blocks.N.1` is
/// `down_blocks.{level}.attentions.{i}`, `middle_block.1` is `mid_block.attentions.0`,
/// `output_blocks.N.1` is `up_blocks.{level}.attentions.{i}`; `per_level` is
/// `num_res_blocks + 1`.
pub fn diffusers_path(path: &str, per_level: usize) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let (head, rest) = match parts.as_slice() {
        ["input_blocks", n, "1", rest @ ..] => {
            let p = n.parse::<usize>().ok()?.checked_sub(1)?;
            (
                format!("down_blocks.{}.attentions.{}", p / per_level, p % per_level),
                rest,
            )
        }
        ["middle_block", "1", rest @ ..] => ("mid_block.attentions.0".to_owned(), rest),
        ["output_blocks", n, "1", rest @ ..] => {
            let n = n.parse::<usize>().ok()?;
            (
                format!("up_blocks.{}.attentions.{}", n / per_level, n % per_level),
                rest,
            )
        }
        _ => return None,
    };
    Some(format!("{head}.{}", rest.join(".")))
}

//! The Stable Diffusion UNet (LDM's `openaimodel.UNetModel`), one configuration type for
//! SD1.x, SDXL and our `tiny` model. Field names follow the original checkpoint layout
//! (`input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`, `time_embed`, `label_emb`,
//! `out`), so a module path is its checkpoint key. The LoRA targets of kohya (`proj_in`,
//! `proj_out`, `attn{1,2}.to_{q,k,v}`, `attn{1,2}.to_out.0`, `ff.net.0.proj`, `ff.net.2`)
//! are plain `Linear`/1x1 `Conv2d` fields of [`SpatialTransformer`] and [`TransformerBlock`].

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, Linear};
use burn::tensor::activation::{gelu, silu};
use burn::tensor::{Device, FloatDType, Gradients, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::{
    GROUP_NORM_GROUPS, NormF32, Slot, compute_dtype, conv2d, from_tokens, group_norm, layer_norm,
    linear, multi_head_attention, timestep_embedding, to_tokens, upsample_nearest_2x,
};

/// How attention heads are sized: SD1 fixes their number, SDXL their width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Heads {
    /// `num_heads`: a fixed number of heads, each `channels / n` wide.
    Count(usize),
    /// `num_head_channels`: heads of a fixed width, `channels / d` of them.
    Dim(usize),
}

impl Heads {
    /// Number of heads for a block of `channels`.
    pub fn heads_for(self, channels: usize) -> usize {
        match self {
            Heads::Count(n) => n,
            Heads::Dim(d) => (channels / d).max(1),
        }
    }

    /// Whether `channels` split evenly into these heads.
    pub fn divides(self, channels: usize) -> bool {
        match self {
            Heads::Count(0) | Heads::Dim(0) => false,
            Heads::Count(n) => channels.is_multiple_of(n),
            Heads::Dim(d) => channels.is_multiple_of(d),
        }
    }
}

/// diffusers' `norm_num_groups` default, the group count of every released SD model.
pub const DEFAULT_NORM_NUM_GROUPS: usize = GROUP_NORM_GROUPS;
/// diffusers' `norm_eps` default, the epsilon of the res blocks' and the output's GroupNorm.
pub const DEFAULT_NORM_EPS: f64 = 1e-5;

fn default_groups() -> usize {
    DEFAULT_NORM_NUM_GROUPS
}

fn is_default_groups(g: &usize) -> bool {
    *g == DEFAULT_NORM_NUM_GROUPS
}

fn default_eps() -> f64 {
    DEFAULT_NORM_EPS
}

fn is_default_eps(eps: &f64) -> bool {
    *eps == DEFAULT_NORM_EPS
}

/// Hyper-parameters of the UNet, named as in the LDM/SGM configs. The GroupNorm fields are
/// left out of the serialisation at their defaults, so the metadata our writer stores for the
/// released configurations keeps its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out (the predicted noise).
    pub out_channels: usize,
    /// Channels of the first level.
    pub model_channels: usize,
    /// Channel multiplier per level.
    pub channel_mult: Vec<usize>,
    /// Res blocks per level on the way down (one more on the way up).
    pub num_res_blocks: usize,
    /// Transformer blocks per spatial transformer at each level; 0 means no attention there.
    pub transformer_depth: Vec<usize>,
    /// Transformer blocks in the middle block's spatial transformer.
    pub transformer_depth_middle: usize,
    /// Head sizing.
    pub heads: Heads,
    /// Width of the text conditioning.
    pub context_dim: usize,
    /// `proj_in`/`proj_out` as linear layers (SDXL) instead of 1x1 convolutions (SD1).
    pub use_linear_projection: bool,
    /// Width of the added ("vector") conditioning SDXL feeds to `label_emb`.
    pub adm_in_channels: Option<usize>,
    /// Width of the sinusoidal embedding of each SDXL size/crop number (256).
    pub size_embed_dim: usize,
    /// GroupNorm's group count everywhere in the UNet (diffusers' `norm_num_groups`, 32).
    /// Shapes cannot tell it: a checkpoint of another count needs its config.
    #[serde(default = "default_groups", skip_serializing_if = "is_default_groups")]
    pub norm_num_groups: usize,
    /// Epsilon of the res blocks' and the output's GroupNorm (diffusers' `norm_eps`, 1e-5);
    /// the spatial transformers' GroupNorm keeps 1e-6, as in both references.
    #[serde(default = "default_eps", skip_serializing_if = "is_default_eps")]
    pub norm_eps: f64,
}

impl UNetConfig {
    /// Stable Diffusion 1.x (860 M parameters).
    pub fn sd15() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            transformer_depth: vec![1, 1, 1, 0],
            transformer_depth_middle: 1,
            heads: Heads::Count(8),
            context_dim: 768,
            use_linear_projection: false,
            adm_in_channels: None,
            size_embed_dim: 256,
            norm_num_groups: DEFAULT_NORM_NUM_GROUPS,
            norm_eps: DEFAULT_NORM_EPS,
        }
    }

    /// SDXL base and its derivatives (2.6 B parameters).
    pub fn sdxl() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4],
            num_res_blocks: 2,
            transformer_depth: vec![0, 2, 10],
            transformer_depth_middle: 10,
            heads: Heads::Dim(64),
            context_dim: 2048,
            use_linear_projection: true,
            adm_in_channels: Some(2816),
            size_embed_dim: 256,
            norm_num_groups: DEFAULT_NORM_NUM_GROUPS,
            norm_eps: DEFAULT_NORM_EPS,
        }
    }

    /// A few-million-parameter model of the SD1 architecture (CLIP-L conditioning), for tests
    /// and the embedded default.
    pub fn tiny() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            model_channels: 64,
            channel_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            transformer_depth: vec![1, 1, 0],
            transformer_depth_middle: 1,
            heads: Heads::Count(4),
            context_dim: 768,
            use_linear_projection: false,
            adm_in_channels: None,
            size_embed_dim: 256,
            norm_num_groups: DEFAULT_NORM_NUM_GROUPS,
            norm_eps: DEFAULT_NORM_EPS,
        }
    }

    /// Whether a UNet of this configuration can be built, before any burn op sees it: every
    /// width non-zero, every normalised width divisible by GroupNorm's `norm_num_groups`,
    /// every attention width divisible by its heads, one transformer depth per level.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("model_channels", self.model_channels),
            ("num_res_blocks", self.num_res_blocks),
            ("context_dim", self.context_dim),
            ("transformer_depth_middle", self.transformer_depth_middle),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("UNet {name} is 0"));
        }
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return Err(format!(
                "UNet channel multipliers {:?} must be non-empty and non-zero",
                self.channel_mult
            ));
        }
        if self.transformer_depth.len() != self.channel_mult.len() {
            return Err(format!(
                "UNet has {} levels but {} transformer depths",
                self.channel_mult.len(),
                self.transformer_depth.len()
            ));
        }
        if matches!(self.heads, Heads::Count(0) | Heads::Dim(0)) {
            return Err(format!("UNet heads {:?}: must be non-zero", self.heads));
        }
        let groups = self.norm_num_groups;
        if groups == 0 {
            return Err("UNet norm_num_groups is 0".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!(
                "UNet norm_eps {} must be a positive number",
                self.norm_eps
            ));
        }
        if !self.model_channels.is_multiple_of(groups) {
            return Err(format!(
                "UNet model_channels {} (conv_in's width) is not divisible by GroupNorm's \
                 {groups} groups (norm_num_groups)",
                self.model_channels
            ));
        }
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            let ch = self
                .model_channels
                .checked_mul(mult)
                .ok_or("UNet width overflows")?;
            if !ch.is_multiple_of(groups) {
                return Err(format!(
                    "UNet level {level} has {ch} channels, not divisible by GroupNorm's \
                     {groups} groups (norm_num_groups)"
                ));
            }
            let attends = self.transformer_depth[level] > 0 || level + 1 == self.channel_mult.len();
            if attends && !self.heads.divides(ch) {
                return Err(format!(
                    "UNet level {level}: {ch} channels do not split into attention heads of \
                     {:?}",
                    self.heads
                ));
            }
        }
        if let Some(0) = self.adm_in_channels {
            return Err("UNet adm_in_channels is 0".into());
        }
        Ok(())
    }

    /// The time-embedding width, `4 * model_channels`.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    /// Builds the UNet with freshly initialised (lazy) parameters.
    pub fn init(&self, device: &Device) -> UNet {
        let mc = self.model_channels;
        let ted = self.time_embed_dim();
        let norm = |ch: usize| group_norm(self.norm_num_groups, ch, self.norm_eps, device);
        let res = |c_in: usize, c_out: usize| ResBlock::new(c_in, c_out, ted, &norm, device);
        let attn = |ch: usize, depth: usize| {
            SpatialTransformer::new(
                ch,
                self.heads.heads_for(ch),
                depth,
                self.context_dim,
                self.use_linear_projection,
                self.norm_num_groups,
                device,
            )
        };

        let mut input_blocks = vec![vec![Layer::Conv(conv2d(
            self.in_channels,
            mc,
            3,
            1,
            device,
        ))]];
        let mut skip_channels = vec![mc];
        let mut ch = mc;
        let levels = self.channel_mult.len();
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            let depth = self.transformer_depth.get(level).copied().unwrap_or(0);
            for _ in 0..self.num_res_blocks {
                let mut block = vec![Layer::Res(res(ch, mc * mult))];
                ch = mc * mult;
                if depth > 0 {
                    block.push(Layer::Attn(attn(ch, depth)));
                }
                input_blocks.push(block);
                skip_channels.push(ch);
            }
            if level + 1 < levels {
                input_blocks.push(vec![Layer::Down(Downsample {
                    op: conv2d(ch, ch, 3, 2, device),
                })]);
                skip_channels.push(ch);
            }
        }

        let middle_block = vec![
            Layer::Res(res(ch, ch)),
            Layer::Attn(attn(ch, self.transformer_depth_middle)),
            Layer::Res(res(ch, ch)),
        ];

        let mut output_blocks = Vec::new();
        for (level, &mult) in self.channel_mult.iter().enumerate().rev() {
            let depth = self.transformer_depth.get(level).copied().unwrap_or(0);
            for i in 0..=self.num_res_blocks {
                let skip = skip_channels.pop().unwrap_or(mc);
                let mut block = vec![Layer::Res(res(ch + skip, mc * mult))];
                ch = mc * mult;
                if depth > 0 {
                    block.push(Layer::Attn(attn(ch, depth)));
                }
                if level > 0 && i == self.num_res_blocks {
                    block.push(Layer::Up(Upsample {
                        conv: conv2d(ch, ch, 3, 1, device),
                    }));
                }
                output_blocks.push(block);
            }
        }

        UNet {
            time_embed: (
                linear(mc, ted, true, device),
                Slot,
                linear(ted, ted, true, device),
            ),
            label_emb: self.adm_in_channels.map(|adm| {
                vec![(
                    linear(adm, ted, true, device),
                    Slot,
                    linear(ted, ted, true, device),
                )]
            }),
            input_blocks,
            middle_block,
            output_blocks,
            out: (norm(ch), Slot, conv2d(ch, self.out_channels, 3, 1, device)),
            model_channels: mc,
            size_embed_dim: self.size_embed_dim,
        }
    }
}

/// The inputs of one UNet evaluation (see [`UNet::forward`]).
pub struct UNetInput {
    /// Noisy latents `[b, 4, h, w]`.
    pub sample: Tensor<4>,
    /// Timesteps `[b]`.
    pub timestep: Tensor<1>,
    /// Text context `[b, n, context_dim]`.
    pub context: Tensor<3>,
    /// SDXL's added conditioning `[b, adm_in_channels]`.
    pub y: Option<Tensor<2>>,
}

/// The denoising UNet: predicts the noise in `sample` at `timestep` given the text context.
#[derive(Module, Debug)]
pub struct UNet {
    /// `time_embed.{0,2}`.
    pub time_embed: (Linear, Slot, Linear),
    /// `label_emb.0.{0,2}`: SDXL's added-conditioning MLP.
    pub label_emb: Option<Vec<(Linear, Slot, Linear)>>,
    /// `input_blocks.N.M`.
    pub input_blocks: Vec<Vec<Layer>>,
    /// `middle_block.N`.
    pub middle_block: Vec<Layer>,
    /// `output_blocks.N.M`.
    pub output_blocks: Vec<Vec<Layer>>,
    /// `out.{0,2}`.
    pub out: (GroupNorm, Slot, Conv2d),
    model_channels: usize,
    size_embed_dim: usize,
}

impl UNet {
    /// Noise prediction for `sample` `[b, 4, h, w]` at `timestep` `[b]`, with `context`
    /// `[b, n, context_dim]` and, for SDXL, the added conditioning `y` `[b, adm_in_channels]`
    /// (see [`UNet::added_conditioning`]).
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timestep: Tensor<1>,
        context: Tensor<3>,
        y: Option<Tensor<2>>,
    ) -> Tensor<4> {
        self.forward_at(sample, timestep, context, y, Scope::base())
    }

    /// [`UNet::forward`] with `adapters`' low-rank branches added to the outputs of the
    /// modules they adapt (`y = W x + branch(x)`, kohya's `LoRAModule.forward`): the base
    /// weights stay constants, so a backward pass tracks only what the branches depend on.
    pub fn forward_adapted(
        &self,
        sample: Tensor<4>,
        timestep: Tensor<1>,
        context: Tensor<3>,
        y: Option<Tensor<2>>,
        adapters: &dyn Adapters,
    ) -> Tensor<4> {
        self.forward_at(sample, timestep, context, y, Scope::adapted(adapters))
    }

    fn forward_at(
        &self,
        sample: Tensor<4>,
        timestep: Tensor<1>,
        context: Tensor<3>,
        y: Option<Tensor<2>>,
        scope: Scope<'_>,
    ) -> Tensor<4> {
        let (sample, emb, context) = self.entry(UNetInput {
            sample,
            timestep,
            context,
            y,
        });
        let plan = self.units();
        let last_use = plan.last_uses();
        // Values are dropped after their last reader, so the forward keeps only the skips.
        let mut values: Vec<Option<Value>> = vec![Some(Value::Map(sample))];
        for (k, unit) in plan.units.iter().enumerate() {
            let inputs = unit
                .inputs
                .iter()
                .map(|&i| {
                    let value = if last_use[i] == k {
                        values[i].take()
                    } else {
                        values[i].clone()
                    };
                    value.expect("a unit reads only values made before it and not yet dropped")
                })
                .collect();
            values.push(Some(self.run_unit(unit, inputs, &emb, &context, &scope)));
        }
        values
            .pop()
            .flatten()
            .expect("the last unit makes the prediction")
            .into_map()
    }

    /// Where the inputs enter the model: the sample, the time embedding (plus SDXL's added
    /// conditioning, `[b, time_embed_dim]`) and the context, in the dtype the UNet computes in
    /// (its weights'; the norms compute in f32 whatever it is). The prediction leaves in f32
    /// (the output head, [`Op::Out`]), so callers see f32 on both sides.
    fn entry(&self, input: UNetInput) -> (Tensor<4>, Tensor<2>, Tensor<3>) {
        let UNetInput {
            sample,
            timestep,
            context,
            y,
        } = input;
        let dtype = compute_dtype(&self.time_embed.0.weight);
        let t_emb = timestep_embedding(timestep, self.model_channels).cast(dtype);
        let y = y.map(|y| y.cast(dtype));
        let (l0, _, l2) = &self.time_embed;
        let mut emb = l2.forward(silu(l0.forward(t_emb)));
        if let (Some(label_emb), Some(y)) = (&self.label_emb, y) {
            for (l0, _, l2) in label_emb {
                emb = emb + l2.forward(silu(l0.forward(y.clone())));
            }
        }
        (sample.cast(dtype), emb, context.cast(dtype))
    }

    /// The forward pass as a list of units (value 0 is the sample, unit `k` makes value
    /// `k + 1`): every ResBlock, sampler and bare convolution is one unit, a spatial
    /// transformer is three kinds (into tokens, one per transformer block, out of tokens), the
    /// skip concatenations and the output head one each. [`UNet::forward`] runs them in
    /// order; the recomputed backward ([`UNet::recomputed_gradients`]) re-runs them one at a
    /// time in reverse.
    fn units(&self) -> Plan<'_> {
        let mut plan = Plan { units: Vec::new() };
        let mut h = 0;
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        for (i, block) in self.input_blocks.iter().enumerate() {
            for (j, layer) in block.iter().enumerate() {
                h = plan.layer(layer, format!("input_blocks.{i}.{j}"), h);
            }
            skips.push(h);
        }
        for (j, layer) in self.middle_block.iter().enumerate() {
            h = plan.layer(layer, format!("middle_block.{j}"), h);
        }
        for (i, block) in self.output_blocks.iter().enumerate() {
            if let Some(skip) = skips.pop() {
                h = plan.push(Op::Cat, String::new(), vec![h, skip]);
            }
            for (j, layer) in block.iter().enumerate() {
                h = plan.layer(layer, format!("output_blocks.{i}.{j}"), h);
            }
        }
        plan.push(Op::Out, String::new(), vec![h]);
        plan
    }

    /// The gradients of `loss(prediction)` with respect to every tracked factor of the
    /// adapters, with per-unit recomputation (kohya's `gradient_checkpointing`). The forward
    /// pass runs untracked through `adapters.0` (the same adapters, untracked) and keeps
    /// only the units' inputs; the backward pass re-runs one unit at a time in reverse through
    /// `adapters.1` (tracked), takes the gradient of `sum(output * gradient of the output)`,
    /// and hands the gradient of each input on to the unit that made it. So at most one
    /// unit's autodiff graph (one transformer block's attention maps, one ResBlock's
    /// activations) is alive at a time. The gradients equal those of a backward pass through
    /// [`UNet::forward_adapted`] up to the order of the sums.
    ///
    /// Returns the loss (without autodiff) and one gradient container per unit that reached a
    /// tracked factor; each factor is used by one unit, so it is in exactly one container.
    pub fn recomputed_gradients(
        &self,
        input: UNetInput,
        adapters: (&dyn Adapters, &dyn Adapters),
        loss: &dyn Fn(Tensor<4>) -> Tensor<1>,
    ) -> (Option<Tensor<1>>, Vec<Gradients>) {
        let (sample, emb, context) = self.entry(input);
        let plan = self.units();
        let count = plan.units.len();
        let (plain, tracked) = (Scope::adapted(adapters.0), Scope::adapted(adapters.1));
        let value = |values: &[Option<Value>], i: usize| {
            values[i]
                .clone()
                .expect("a unit reads only values made before it")
        };

        // The forward runs on the autodiff device but tracks nothing (no input requires a
        // gradient and the adapters are untracked), so every unit computes what its tracked
        // re-run computes (burn's decomposed attention, not flex's fused kernel): the values
        // handed on equal the re-run's outputs.
        let mut values: Vec<Option<Value>> = Vec::with_capacity(count + 1);
        values.push(Some(Value::Map(sample.autodiff())));
        // The output head is left for the backward pass, which starts by re-running it.
        for unit in plan.units.iter().take(count.saturating_sub(1)) {
            let inputs = unit.inputs.iter().map(|&i| value(&values, i)).collect();
            values.push(Some(self.run_unit(unit, inputs, &emb, &context, &plain)));
        }
        values.push(None);

        let mut gradient_of: Vec<Option<Value>> = vec![None; count + 1];
        let mut containers = Vec::new();
        let mut loss_value = None;
        for (k, unit) in plan.units.iter().enumerate().rev() {
            // The sample (value 0) is a constant; every other input is a fresh leaf.
            let leaves: Vec<Value> = unit
                .inputs
                .iter()
                .map(|&i| match i {
                    0 => value(&values, i),
                    _ => value(&values, i).leaf(),
                })
                .collect();
            let out = self.run_unit(unit, leaves.clone(), &emb, &context, &tracked);
            values[k + 1] = None;
            let objective = if k + 1 == count {
                let l = loss(out.into_map());
                loss_value = Some(l.clone().without_autodiff());
                l
            } else {
                match gradient_of[k + 1].take() {
                    Some(gradient) => out.dot(gradient),
                    None => continue,
                }
            };
            if !objective.is_tracked() {
                continue;
            }
            let mut grads = objective.backward();
            for (leaf, &i) in leaves.iter().zip(&unit.inputs) {
                if let Some(g) = leaf.grad_remove(&mut grads) {
                    gradient_of[i] = Some(match gradient_of[i].take() {
                        Some(sum) => sum.add(g),
                        None => g,
                    });
                }
            }
            containers.push(grads);
        }
        (loss_value, containers)
    }

    /// Runs one unit on its inputs (in the order of `unit.inputs`).
    fn run_unit(
        &self,
        unit: &Unit<'_>,
        inputs: Vec<Value>,
        emb: &Tensor<2>,
        context: &Tensor<3>,
        scope: &Scope<'_>,
    ) -> Value {
        let at = scope.at(&unit.path);
        let mut inputs = inputs.into_iter();
        let mut next = || {
            inputs
                .next()
                .expect("a unit gets as many inputs as it names")
        };
        match unit.op {
            Op::Conv(conv) => Value::Map(conv.forward(next().into_map())),
            Op::Res(res) => Value::Map(res.forward(next().into_map(), emb.clone(), at)),
            Op::Down(down) => Value::Map(at.conv("op", &down.op, next().into_map())),
            Op::Up(up) => {
                Value::Map(at.conv("conv", &up.conv, upsample_nearest_2x(next().into_map())))
            }
            Op::AttnIn(attn) => Value::Tokens(attn.enter(next().into_map(), &at)),
            Op::AttnBlock(block) => {
                Value::Tokens(block.forward(next().into_tokens(), context.clone(), at))
            }
            Op::AttnOut(attn) => {
                let tokens = next().into_tokens();
                Value::Map(attn.leave(tokens, next().into_map(), &at))
            }
            Op::Cat => {
                let h = next().into_map();
                Value::Map(Tensor::cat(vec![h, next().into_map()], 1))
            }
            Op::Out => {
                let (norm, _, conv) = &self.out;
                let out = conv.forward(silu(norm.forward_f32(next().into_map())));
                Value::Map(out.cast(FloatDType::F32))
            }
        }
    }

    /// SDXL's added conditioning: the pooled text embedding `[b, 1280]` followed by the
    /// sinusoidal embeddings of the six size numbers `time_ids` `[b, 6]` (original h, w,
    /// crop top, left, target h, w), as diffusers' `text_embeds` and `time_ids`.
    pub fn added_conditioning(&self, text_embeds: Tensor<2>, time_ids: Tensor<2>) -> Tensor<2> {
        added_conditioning(self.size_embed_dim, text_embeds, time_ids)
    }

    /// Whether this UNet takes SDXL's added conditioning.
    pub fn takes_added_conditioning(&self) -> bool {
        self.label_emb.is_some()
    }
}

/// SDXL's added conditioning for a UNet of `size_embed_dim` (see
/// [`UNet::added_conditioning`]), without the UNet: a training run computes it with the
/// caption, before its UNet is loaded.
pub fn added_conditioning(
    size_embed_dim: usize,
    text_embeds: Tensor<2>,
    time_ids: Tensor<2>,
) -> Tensor<2> {
    let [b, n] = time_ids.dims();
    let sizes = timestep_embedding(time_ids.reshape([b * n]), size_embed_dim)
        .reshape([b, n * size_embed_dim]);
    Tensor::cat(vec![text_embeds, sizes], 1)
}

/// A value between two units: a feature map `[b, c, h, w]` or tokens `[b, h * w, c]`.
#[derive(Clone)]
enum Value {
    Map(Tensor<4>),
    Tokens(Tensor<3>),
}

impl Value {
    /// The value as a tracked autodiff leaf.
    fn leaf(self) -> Self {
        match self {
            Value::Map(t) => Value::Map(t.autodiff().detach().require_grad()),
            Value::Tokens(t) => Value::Tokens(t.autodiff().detach().require_grad()),
        }
    }

    /// Its gradient, taken out of `grads`.
    fn grad_remove(&self, grads: &mut Gradients) -> Option<Value> {
        match self {
            Value::Map(t) => t.grad_remove(grads).map(Value::Map),
            Value::Tokens(t) => t.grad_remove(grads).map(Value::Tokens),
        }
    }

    /// The elementwise sum of two values of one shape.
    fn add(self, other: Value) -> Value {
        match (self, other) {
            (Value::Map(a), b) => Value::Map(a + b.into_map()),
            (Value::Tokens(a), b) => Value::Tokens(a + b.into_tokens()),
        }
    }

    /// `sum(self * weights)`: the scalar whose gradient is `weights`' pull-back.
    fn dot(self, weights: Value) -> Tensor<1> {
        match (self, weights) {
            (Value::Map(a), b) => (a * b.into_map()).sum(),
            (Value::Tokens(a), b) => (a * b.into_tokens()).sum(),
        }
    }

    fn into_map(self) -> Tensor<4> {
        match self {
            Value::Map(t) => t,
            Value::Tokens(_) => panic!("a unit that reads a feature map was given tokens"),
        }
    }

    fn into_tokens(self) -> Tensor<3> {
        match self {
            Value::Tokens(t) => t,
            Value::Map(_) => panic!("a unit that reads tokens was given a feature map"),
        }
    }
}

/// What a unit computes.
#[derive(Clone, Copy)]
enum Op<'m> {
    Conv(&'m Conv2d),
    Res(&'m ResBlock),
    Down(&'m Downsample),
    Up(&'m Upsample),
    AttnIn(&'m SpatialTransformer),
    AttnBlock(&'m TransformerBlock),
    AttnOut(&'m SpatialTransformer),
    Cat,
    Out,
}

/// One unit of the forward pass: its op, its module path (where its adapters are looked up)
/// and the values it reads.
struct Unit<'m> {
    op: Op<'m>,
    path: String,
    inputs: Vec<usize>,
}

/// The units of a forward pass, in order.
struct Plan<'m> {
    units: Vec<Unit<'m>>,
}

impl<'m> Plan<'m> {
    /// Appends a unit; returns the index of the value it makes.
    fn push(&mut self, op: Op<'m>, path: String, inputs: Vec<usize>) -> usize {
        self.units.push(Unit { op, path, inputs });
        self.units.len()
    }

    /// The units of one layer of a block at `path`, reading value `h`.
    fn layer(&mut self, layer: &'m Layer, path: String, h: usize) -> usize {
        match layer {
            Layer::Conv(conv) => self.push(Op::Conv(conv), path, vec![h]),
            Layer::Res(res) => self.push(Op::Res(res), path, vec![h]),
            Layer::Down(down) => self.push(Op::Down(down), path, vec![h]),
            Layer::Up(up) => self.push(Op::Up(up), path, vec![h]),
            Layer::Attn(attn) => {
                let mut t = self.push(Op::AttnIn(attn), path.clone(), vec![h]);
                for (k, block) in attn.transformer_blocks.iter().enumerate() {
                    let at = format!("{path}.transformer_blocks.{k}");
                    t = self.push(Op::AttnBlock(block), at, vec![t]);
                }
                self.push(Op::AttnOut(attn), path, vec![t, h])
            }
        }
    }

    /// For each value, the index of the last unit that reads it (the final value: past the
    /// end).
    fn last_uses(&self) -> Vec<usize> {
        let mut last = vec![self.units.len(); self.units.len() + 1];
        for (k, unit) in self.units.iter().enumerate() {
            for &i in &unit.inputs {
                last[i] = k;
            }
        }
        last
    }
}

/// Low-rank branches added to the outputs of adapted modules during a forward pass. A module
/// is named by its path in the checkpoint layout, without `.weight`
/// (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`); `None` leaves it as it is.
pub trait Adapters {
    /// The term added to the output of the linear module at `path` for the input `x`,
    /// `[batch, tokens, in]` (a ResNet block's time-embedding projection sees
    /// `[batch, 1, in]`).
    fn linear(&self, path: &str, x: &Tensor<3>) -> Option<Tensor<3>>;
    /// The term added to the output of the convolution `conv` at `path` for the input `x`.
    fn conv(&self, path: &str, conv: &Conv2d, x: &Tensor<4>) -> Option<Tensor<4>>;
}

/// Where a forward pass is in the module tree, and the adapters to consult there. The path is
/// only built when there are adapters, so a base forward pass does no string work.
#[derive(Clone)]
struct Scope<'a> {
    adapters: Option<&'a dyn Adapters>,
    path: String,
}

impl<'a> Scope<'a> {
    fn base() -> Self {
        Self {
            adapters: None,
            path: String::new(),
        }
    }

    fn adapted(adapters: &'a dyn Adapters) -> Self {
        Self {
            adapters: Some(adapters),
            path: String::new(),
        }
    }

    /// The scope of the module at `path` (from the root), with this scope's adapters.
    fn at(&self, path: &str) -> Scope<'a> {
        Scope {
            adapters: self.adapters,
            path: match self.adapters {
                Some(_) => path.to_owned(),
                None => String::new(),
            },
        }
    }

    fn child(&self, name: impl std::fmt::Display) -> Scope<'a> {
        let path = match (self.adapters, self.path.is_empty()) {
            (None, _) => String::new(),
            (Some(_), true) => name.to_string(),
            (Some(_), false) => format!("{}.{name}", self.path),
        };
        Scope {
            adapters: self.adapters,
            path,
        }
    }

    /// `layer(x)` plus the branch of the linear module `name` under this scope.
    fn linear(&self, name: impl std::fmt::Display, layer: &Linear, x: Tensor<3>) -> Tensor<3> {
        let Some(adapters) = self.adapters else {
            return layer.forward(x);
        };
        match adapters.linear(&self.child(name).path, &x) {
            Some(branch) => layer.forward(x) + branch,
            None => layer.forward(x),
        }
    }

    /// `layer(x)` on `[batch, features]` plus its branch (the ResBlock's `emb_layers.1`).
    fn linear_2d(&self, name: impl std::fmt::Display, layer: &Linear, x: Tensor<2>) -> Tensor<2> {
        let Some(adapters) = self.adapters else {
            return layer.forward(x);
        };
        let [b, d] = x.dims();
        let tokens = x.clone().reshape([b, 1, d]);
        match adapters.linear(&self.child(name).path, &tokens) {
            Some(branch) => {
                let [_, _, out] = branch.dims();
                layer.forward(x) + branch.reshape([b, out])
            }
            None => layer.forward(x),
        }
    }

    /// `conv(x)` plus the branch of the convolution `name` under this scope.
    fn conv(&self, name: impl std::fmt::Display, conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        let Some(adapters) = self.adapters else {
            return conv.forward(x);
        };
        match adapters.conv(&self.child(name).path, conv, &x) {
            Some(branch) => conv.forward(x) + branch,
            None => conv.forward(x),
        }
    }
}

/// One slot of a UNet block (`TimestepEmbedSequential` in LDM).
// A UNet holds a few dozen of these; boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Layer {
    /// The first convolution (`input_blocks.0.0`).
    Conv(Conv2d),
    /// A residual block with time embedding.
    Res(ResBlock),
    /// A spatial transformer.
    Attn(SpatialTransformer),
    /// Strided-conv downsampling (`op`).
    Down(Downsample),
    /// Nearest upsampling then conv (`conv`).
    Up(Upsample),
}

/// `Downsample`: a 3x3 stride-2 convolution.
#[derive(Module, Debug)]
pub struct Downsample {
    /// The convolution.
    pub op: Conv2d,
}

/// `Upsample`: nearest 2x then a 3x3 convolution.
#[derive(Module, Debug)]
pub struct Upsample {
    /// The convolution.
    pub conv: Conv2d,
}

/// `ResBlock`: two GroupNorm-SiLU-conv stages with the time embedding added in between.
#[derive(Module, Debug)]
pub struct ResBlock {
    /// `in_layers.{0,2}`.
    pub in_layers: (GroupNorm, Slot, Conv2d),
    /// `emb_layers.1`.
    pub emb_layers: (Slot, Linear),
    /// `out_layers.{0,3}` (slot 2 is dropout).
    pub out_layers: (GroupNorm, Slot, Slot, Conv2d),
    /// 1x1 convolution when the channel count changes.
    pub skip_connection: Option<Conv2d>,
}

impl ResBlock {
    fn new(
        c_in: usize,
        c_out: usize,
        emb_dim: usize,
        norm: &dyn Fn(usize) -> GroupNorm,
        device: &Device,
    ) -> Self {
        Self {
            in_layers: (norm(c_in), Slot, conv2d(c_in, c_out, 3, 1, device)),
            emb_layers: (Slot, linear(emb_dim, c_out, true, device)),
            out_layers: (norm(c_out), Slot, Slot, conv2d(c_out, c_out, 3, 1, device)),
            skip_connection: (c_in != c_out).then(|| conv2d(c_in, c_out, 1, 1, device)),
        }
    }

    fn forward(&self, x: Tensor<4>, emb: Tensor<2>, at: Scope<'_>) -> Tensor<4> {
        let (n0, _, c0) = &self.in_layers;
        let h = at
            .child("in_layers")
            .conv(2, c0, silu(n0.forward_f32(x.clone())));
        let e = at
            .child("emb_layers")
            .linear_2d(1, &self.emb_layers.1, silu(emb));
        let [b, c] = e.dims();
        let h = h + e.reshape([b, c, 1, 1]);
        let (n1, _, _, c1) = &self.out_layers;
        let h = at.child("out_layers").conv(3, c1, silu(n1.forward_f32(h)));
        match &self.skip_connection {
            Some(skip) => at.conv("skip_connection", skip, x) + h,
            None => x + h,
        }
    }
}

/// `proj_in`/`proj_out`: 1x1 convolution (SD1) or linear (SDXL).
#[derive(Module, Debug)]
pub enum Projection {
    /// 1x1 convolution on `[b, c, h, w]`.
    Conv(Conv2d),
    /// Linear on tokens `[b, h * w, c]`.
    Linear(Linear),
}

/// `SpatialTransformer`: GroupNorm, projection to tokens, transformer blocks, projection
/// back, residual.
#[derive(Module, Debug)]
pub struct SpatialTransformer {
    /// GroupNorm (eps 1e-6).
    pub norm: GroupNorm,
    /// Into the token space.
    pub proj_in: Projection,
    /// `transformer_blocks.N`.
    pub transformer_blocks: Vec<TransformerBlock>,
    /// Out of the token space.
    pub proj_out: Projection,
}

impl SpatialTransformer {
    fn new(
        ch: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        linear_proj: bool,
        groups: usize,
        device: &Device,
    ) -> Self {
        let proj = || {
            if linear_proj {
                Projection::Linear(linear(ch, ch, true, device))
            } else {
                Projection::Conv(conv2d(ch, ch, 1, 1, device))
            }
        };
        Self {
            norm: group_norm(groups, ch, 1e-6, device),
            proj_in: proj(),
            transformer_blocks: (0..depth)
                .map(|_| TransformerBlock::new(ch, heads, context_dim, device))
                .collect(),
            proj_out: proj(),
        }
    }

    /// GroupNorm and `proj_in`: the tokens the transformer blocks read.
    fn enter(&self, x: Tensor<4>, at: &Scope<'_>) -> Tensor<3> {
        let normed = self.norm.forward_f32(x);
        match &self.proj_in {
            Projection::Conv(conv) => to_tokens(at.conv("proj_in", conv, normed)),
            Projection::Linear(lin) => at.linear("proj_in", lin, to_tokens(normed)),
        }
    }

    /// `proj_out` of the blocks' tokens `t`, back to the shape of the input `x`, plus `x`.
    fn leave(&self, t: Tensor<3>, x: Tensor<4>, at: &Scope<'_>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let out = match &self.proj_out {
            Projection::Conv(conv) => at.conv("proj_out", conv, from_tokens(t, h, w)),
            Projection::Linear(lin) => from_tokens(at.linear("proj_out", lin, t), h, w),
        };
        out + x
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-norm.
#[derive(Module, Debug)]
pub struct TransformerBlock {
    /// Self-attention.
    pub attn1: Attention,
    /// Feed-forward.
    pub ff: FeedForward,
    /// Cross-attention on the text context.
    pub attn2: Attention,
    /// Before `attn1`.
    pub norm1: LayerNorm,
    /// Before `attn2`.
    pub norm2: LayerNorm,
    /// Before `ff`.
    pub norm3: LayerNorm,
}

impl TransformerBlock {
    fn new(dim: usize, heads: usize, context_dim: usize, device: &Device) -> Self {
        Self {
            attn1: Attention::new(dim, dim, heads, device),
            ff: FeedForward::new(dim, device),
            attn2: Attention::new(dim, context_dim, heads, device),
            norm1: layer_norm(dim, device),
            norm2: layer_norm(dim, device),
            norm3: layer_norm(dim, device),
        }
    }

    fn forward(&self, x: Tensor<3>, context: Tensor<3>, at: Scope<'_>) -> Tensor<3> {
        let n = self.norm1.forward_f32(x.clone());
        let x = self.attn1.forward(n.clone(), n, at.child("attn1")) + x;
        let x = self.attn2.forward(
            self.norm2.forward_f32(x.clone()),
            context,
            at.child("attn2"),
        ) + x;
        self.ff
            .forward(self.norm3.forward_f32(x.clone()), at.child("ff"))
            + x
    }
}

/// `CrossAttention`: bias-free q/k/v projections, output projection with bias.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// `to_out.0`.
    pub to_out: Vec<Linear>,
    heads: usize,
}

impl Attention {
    fn new(dim: usize, context_dim: usize, heads: usize, device: &Device) -> Self {
        Self {
            to_q: linear(dim, dim, false, device),
            to_k: linear(context_dim, dim, false, device),
            to_v: linear(context_dim, dim, false, device),
            to_out: vec![linear(dim, dim, true, device)],
            heads,
        }
    }

    fn forward(&self, x: Tensor<3>, context: Tensor<3>, at: Scope<'_>) -> Tensor<3> {
        let q = at.linear("to_q", &self.to_q, x);
        let k = at.linear("to_k", &self.to_k, context.clone());
        let v = at.linear("to_v", &self.to_v, context);
        let mut out = multi_head_attention(q, k, v, self.heads, false);
        let to_out = at.child("to_out");
        for (i, proj) in self.to_out.iter().enumerate() {
            out = to_out.linear(i, proj, out);
        }
        out
    }
}

/// GEGLU feed-forward: `net.0.proj` to twice the inner width, gate with GELU, `net.2` back.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// `net.0` (GEGLU), `net.1` (dropout), `net.2`.
    pub net: (Geglu, Slot, Linear),
}

/// `GEGLU`: one projection holding the value and the gate halves.
#[derive(Module, Debug)]
pub struct Geglu {
    /// `proj`.
    pub proj: Linear,
}

impl FeedForward {
    fn new(dim: usize, device: &Device) -> Self {
        let inner = 4 * dim;
        Self {
            net: (
                Geglu {
                    proj: linear(dim, 2 * inner, true, device),
                },
                Slot,
                linear(inner, dim, true, device),
            ),
        }
    }

    fn forward(&self, x: Tensor<3>, at: Scope<'_>) -> Tensor<3> {
        let net = at.child("net");
        let h = net.child(0).linear("proj", &self.net.0.proj, x);
        let mut halves = h.chunk(2, 2);
        let gate = halves.pop().expect("chunk(2) yields two halves");
        let value = halves.pop().expect("chunk(2) yields two halves");
        net.linear(2, &self.net.2, value * gelu(gate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::param_keys;

    /// (config, parameter count of the reference implementation, transformer blocks).
    #[test]
    fn presets_have_the_reference_parameter_counts() {
        let device = Device::flex();
        for (name, config, params, blocks) in [
            ("sd15", UNetConfig::sd15(), 859_520_964usize, 16usize),
            ("sdxl", UNetConfig::sdxl(), 2_567_463_684, 70),
            // diffusers' UNet2DConditionModel with the same hyper-parameters.
            ("tiny", UNetConfig::tiny(), 6_826_244, 7),
        ] {
            let unet = config.init(&device);
            let keys = param_keys(&unet);
            let count: usize = keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            assert_eq!(count, params, "{name}");
            let n_blocks = keys
                .iter()
                .filter(|(k, _)| k.key.ends_with("attn1.to_q.weight"))
                .count();
            assert_eq!(n_blocks, blocks, "{name}");
        }
    }

    #[test]
    fn keys_follow_the_original_layout() {
        let device = Device::flex();
        let keys: Vec<String> = param_keys(&UNetConfig::sd15().init(&device))
            .into_iter()
            .map(|(k, _)| k.key)
            .collect();
        for want in [
            "time_embed.0.weight",
            "time_embed.2.bias",
            "input_blocks.0.0.weight",
            "input_blocks.1.0.in_layers.0.weight",
            "input_blocks.1.0.emb_layers.1.weight",
            "input_blocks.1.0.out_layers.3.weight",
            "input_blocks.1.1.proj_in.weight",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias",
            "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
            "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
            "input_blocks.1.1.transformer_blocks.0.norm3.bias",
            "input_blocks.3.0.op.weight",
            "input_blocks.4.0.skip_connection.weight",
            "middle_block.1.norm.weight",
            "middle_block.2.out_layers.3.bias",
            "output_blocks.2.1.conv.weight",
            "output_blocks.5.2.conv.weight",
            "out.0.weight",
            "out.2.bias",
        ] {
            assert!(keys.iter().any(|k| k == want), "missing {want}");
        }
        assert_eq!(keys.len(), 686, "SD1.5 UNet tensors");
    }
}

//! Node kinds: the parameter names each accepts (kohya's names), their defaults, and the
//! decoding of a node's YAML mapping into typed [`NodeParams`], resolving node references
//! and file paths on the way.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use crate::diag::{Diag, Span, closest};
use crate::plan::*;
use crate::yaml::{Entry, Value, Yaml};

/// Every node kind, as written after `kind:`.
pub const KINDS: [&str; 8] = [
    "train",
    "svd_merge",
    "merge",
    "resize",
    "merge_into_model",
    "xy_plot",
    "evaluate",
    "command",
];

/// The parameters each kind accepts.
pub fn param_names(kind: &str) -> &'static [&'static str] {
    match kind {
        "svd_merge" => &[
            "models",
            "ratios",
            "new_rank",
            "new_conv_rank",
            "precision",
            "save_precision",
            "clamp_quantile",
        ],
        "merge" => &["models", "ratios", "save_precision"],
        "merge_into_model" => &["base", "models", "ratios", "save_precision"],
        "resize" => &[
            "model",
            "new_rank",
            "new_conv_rank",
            "dynamic_method",
            "dynamic_param",
            "rank_rule",
            "save_precision",
        ],
        "command" => &["run", "inputs", "outputs"],
        "train" => &[
            "base",
            "base_config",
            "images",
            "caption",
            "learning_rate",
            "unet_lr",
            "train_batch_size",
            "max_train_steps",
            "network_dim",
            "network_alpha",
            "conv_dim",
            "conv_alpha",
            "network_train_unet_only",
            "lr_scheduler",
            "lr_warmup_steps",
            "optimizer_type",
            "optimizer_args",
            "seed",
            "resolution",
            "noise_offset",
            "min_snr_gamma",
            "mixed_precision",
            "no_half_vae",
            "gradient_checkpointing",
            "save_precision",
            "checkpoint_every",
            "training_comment",
            "trainer",
            "sd_scripts",
            "sd_scripts_python",
        ],
        "xy_plot" => &[
            "base",
            "base_config",
            "loras",
            "prompt",
            "negative_prompt",
            "x",
            "y",
            "steps",
            "cfg_scale",
            "sampler",
            "width",
            "height",
            "cell_scale",
        ],
        "evaluate" => &[
            "base",
            "base_config",
            "lora",
            "meter",
            "weights",
            "seeds",
            "prompts",
            "negative_prompt",
            "steps",
            "cfg_scale",
            "sampler",
            "width",
            "height",
        ],
        _ => &[],
    }
}

/// Kinds whose `base` defaults to the recipe's top-level `base`.
pub const KINDS_WITH_BASE: [&str; 4] = ["train", "xy_plot", "evaluate", "merge_into_model"];

pub const AXES: [&str; 4] = ["weight", "seed", "prompt", "lora"];

/// What a node reference must produce to fit the slot it is used in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// A LoRA file (`models`, `model`, `loras`, a `lora` axis).
    Lora,
    /// A base model checkpoint (`base`).
    Model,
    /// A training image (`images`).
    Image,
    /// The eye meter's weights (`evaluate`'s `meter`).
    Meter,
    /// A base model's diffusers `config.json` (`base_config`).
    Config,
    /// Anything (`command` inputs).
    Any,
}

/// What a node's primary output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Produces {
    Lora,
    /// A model checkpoint (`merge_into_model`).
    Model,
    Image,
    OtherFile,
}

/// One use of another node's output, for type checks and the graph.
#[derive(Debug, Clone)]
pub(crate) struct RefUse {
    pub from: String,
    pub to: String,
    pub slot: Slot,
    pub key: &'static str,
    pub span: Span,
}

/// How strings in input slots are resolved: node names first, then files.
pub(crate) struct Resolver {
    pub names: Vec<String>,
    pub name_set: HashSet<String>,
    /// Absolute directory relative paths are resolved against.
    pub root: PathBuf,
    /// The same directory as the user named it, for messages.
    pub root_display: String,
}

impl Resolver {
    fn resolve(&self, s: &str, span: Span) -> Result<Result<String, PathBuf>, Diag> {
        if self.name_set.contains(s) {
            return Ok(Ok(s.to_owned()));
        }
        let path = normalize(&self.root.join(s));
        if path.is_file() {
            return Ok(Err(path));
        }
        if path.is_dir() {
            return Err(Diag::new(
                "recipe::not_a_file",
                format!("`{s}` is a directory"),
                span,
                "expected a file or a node name",
            )
            .help("name the file inside it"));
        }
        let near = closest(s, self.names.iter().map(String::as_str));
        Err(match near {
            Some(n) => Diag::new(
                "recipe::unknown_node",
                format!("`{s}` is neither a node nor a file"),
                span,
                "no node has this name and no file is at this path",
            )
            .help(format!("did you mean the node `{n}`?")),
            None => Diag::new(
                "recipe::missing_file",
                format!("file not found: `{s}`"),
                span,
                "no such file",
            )
            .help(format!(
                "paths are relative to the recipe's directory (`{}`); a string equal to a node's \
                 name refers to that node",
                self.root_display
            )),
        })
    }
}

/// Removes `.` and resolves `..` lexically (no symlinks followed), so keys and messages
/// name `a/b.png`, not `a/./x/../b.png`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Reads the fields of one node, collecting every problem instead of stopping at the first.
pub(crate) struct Fields<'a> {
    pub node: &'a str,
    pub kind: &'static str,
    /// Where the node is named (for "missing key" errors).
    pub node_span: Span,
    pub entries: &'a [Entry],
    pub resolver: &'a Resolver,
    pub diags: &'a mut Vec<Diag>,
    pub refs: &'a mut Vec<RefUse>,
}

type Got<T> = Option<T>;

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Yaml> {
        self.entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| &e.value)
            .filter(|y| !matches!(y.value, Value::Null | Value::Poisoned))
    }

    fn type_error(&mut self, key: &str, y: &Yaml, expected: &str, example: &str) {
        if matches!(y.value, Value::Poisoned) {
            return;
        }
        self.diags.push(
            Diag::new(
                "recipe::wrong_type",
                format!("`{key}` must be {expected}"),
                y.span,
                format!("found {}", y.value.describe()),
            )
            .help(format!("expected {example}")),
        );
    }

    fn missing(&mut self, key: &str, example: &str) {
        let poisoned = self
            .entries
            .iter()
            .any(|e| e.key == key && matches!(e.value.value, Value::Poisoned));
        if poisoned {
            return;
        }
        self.diags.push(
            Diag::new(
                "recipe::missing_key",
                format!("`{}` node `{}` has no `{key}`", self.kind, self.node),
                self.node_span,
                format!("`{key}` is required"),
            )
            .help(format!("add `{key}: {example}`")),
        );
    }

    /// A value that is valid kohya but that this build cannot honour: refused rather than
    /// ignored.
    fn not_implemented(&mut self, span: Span, message: String, label: &str, help: &str) {
        self.diags
            .push(Diag::new("recipe::not_implemented", message, span, label.to_owned()).help(help));
    }

    fn bad_value(&mut self, span: Span, message: String, label: &str, help: String) {
        self.diags
            .push(Diag::new("recipe::bad_value", message, span, label.to_owned()).help(help));
    }

    fn number(&mut self, key: &str) -> Got<(f64, Span)> {
        let y = self.get(key)?.clone();
        match y.value {
            Value::Int(i) => Some((i as f64, y.span)),
            Value::Float(f) if f.is_finite() => Some((f, y.span)),
            _ => {
                self.type_error(key, &y, "a number", "a number like 0.75");
                None
            }
        }
    }

    fn f64_or(&mut self, key: &str, default: f64) -> f64 {
        self.number(key).map_or(default, |(v, _)| v)
    }

    fn opt_f64(&mut self, key: &str) -> Option<f64> {
        self.number(key).map(|(v, _)| v)
    }

    fn positive_f64_or(&mut self, key: &str, default: f64) -> f64 {
        match self.number(key) {
            Some((v, _)) if v > 0.0 => v,
            Some((v, span)) => {
                self.bad_value(
                    span,
                    format!("`{key}` must be greater than 0"),
                    "not positive",
                    format!("expected a positive number, found {v}"),
                );
                default
            }
            None => default,
        }
    }

    fn whole(&mut self, key: &str) -> Got<(u64, Span)> {
        let y = self.get(key)?.clone();
        match y.value {
            Value::Int(i) if i >= 0 => Some((i as u64, y.span)),
            Value::Int(_) => {
                self.type_error(key, &y, "a whole number, not negative", "a number like 8");
                None
            }
            _ => {
                self.type_error(key, &y, "a whole number", "a whole number like 8");
                None
            }
        }
    }

    fn count_or(&mut self, key: &str, default: usize, min: usize) -> usize {
        match self.whole(key) {
            Some((v, span)) if (v as usize) < min => {
                self.bad_value(
                    span,
                    format!("`{key}` must be at least {min}"),
                    "too small",
                    format!("expected a whole number of at least {min}"),
                );
                default
            }
            Some((v, _)) => v as usize,
            None => default,
        }
    }

    fn opt_count(&mut self, key: &str) -> Option<usize> {
        match self.whole(key) {
            Some((0, span)) => {
                self.bad_value(
                    span,
                    format!("`{key}` must be at least 1"),
                    "zero",
                    format!("leave `{key}` out (or null) to disable it"),
                );
                None
            }
            other => other.map(|(v, _)| v as usize),
        }
    }

    fn bool_or(&mut self, key: &str, default: bool) -> bool {
        let Some(y) = self.get(key).cloned() else {
            return default;
        };
        match y.value {
            Value::Bool(b) => b,
            _ => {
                self.type_error(key, &y, "true or false", "`true` or `false`");
                default
            }
        }
    }

    /// Any scalar as text (a caption `1girl` or a prompt that happens to be a number).
    fn text(&mut self, key: &str) -> Got<(String, Span)> {
        let y = self.get(key)?.clone();
        match (&y.value, y.value.scalar_text()) {
            (Value::Seq(_) | Value::Map(_), _) | (_, None) => {
                self.type_error(
                    key,
                    &y,
                    "a string",
                    "some text, e.g. \"1girl, best quality\"",
                );
                None
            }
            (_, Some(t)) => Some((t, y.span)),
        }
    }

    fn text_or(&mut self, key: &str, default: &str) -> String {
        self.text(key)
            .map_or_else(|| default.to_owned(), |(t, _)| t)
    }

    /// One of `choices` (matched case-insensitively, returned as spelled in `choices`).
    fn choice(&mut self, key: &str, choices: &[&'static str]) -> Got<(&'static str, Span)> {
        let (t, span) = self.text(key)?;
        if let Some(c) = choices.iter().find(|c| c.eq_ignore_ascii_case(&t)) {
            return Some((c, span));
        }
        let list = choices
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let help = match closest(&t, choices.iter().copied()) {
            Some(c) => format!("did you mean `{c}`? (one of {list})"),
            None => format!("expected one of {list}"),
        };
        self.diags.push(
            Diag::new(
                "recipe::bad_value",
                format!("`{t}` is not a valid `{key}`"),
                span,
                "unknown value",
            )
            .help(help),
        );
        None
    }

    /// One value of a protocol choice enum, by its recipe name.
    fn named<T: Copy>(
        &mut self,
        key: &str,
        names: &[&'static str],
        from_name: impl Fn(&str) -> Option<T>,
    ) -> Got<(T, Span)> {
        let (name, span) = self.choice(key, names)?;
        from_name(name).map(|v| (v, span))
    }

    fn precision(&mut self, key: &str) -> Option<Precision> {
        self.choice(key, &["float", "fp16", "bf16"])
            .map(|(c, _)| match c {
                "fp16" => Precision::Fp16,
                "bf16" => Precision::Bf16,
                _ => Precision::Float,
            })
    }

    fn list(&mut self, key: &str, example: &str) -> Got<(Vec<Yaml>, Span)> {
        let y = self.get(key)?.clone();
        match y.value {
            Value::Seq(items) => Some((items, y.span)),
            _ => {
                self.type_error(key, &y, "a list", example);
                None
            }
        }
    }

    fn numbers(&mut self, key: &str) -> Got<(Vec<f64>, Span)> {
        let (items, span) = self.list(key, "a list of numbers like [1.5, -1.5]")?;
        let mut out = Vec::new();
        for item in &items {
            match item.value {
                Value::Int(i) => out.push(i as f64),
                Value::Float(f) if f.is_finite() => out.push(f),
                _ => {
                    self.type_error(key, item, "a list of numbers", "a number like 0.75");
                    return None;
                }
            }
        }
        Some((out, span))
    }

    fn input_at(&mut self, key: &'static str, y: &Yaml, slot: Slot) -> Option<Input> {
        let Value::Str(s) = &y.value else {
            self.type_error(
                key,
                y,
                "a node name or a file path",
                "a node name or a path",
            );
            return None;
        };
        match self.resolver.resolve(s, y.span) {
            Ok(Ok(node)) => {
                self.refs.push(RefUse {
                    from: self.node.to_owned(),
                    to: node.clone(),
                    slot,
                    key,
                    span: y.span,
                });
                Some(Input::Node(node))
            }
            Ok(Err(path)) => Some(Input::File(path)),
            Err(d) => {
                self.diags.push(d);
                None
            }
        }
    }

    fn input(&mut self, key: &'static str, slot: Slot) -> Got<Input> {
        let y = self.get(key)?.clone();
        self.input_at(key, &y, slot)
    }

    fn inputs(&mut self, key: &'static str, slot: Slot) -> Got<(Vec<Input>, Span)> {
        let (items, span) = self.list(key, "a list of node names or paths")?;
        let mut out = Vec::new();
        let mut ok = true;
        for item in &items {
            match self.input_at(key, item, slot) {
                Some(i) => out.push(i),
                None => ok = false,
            }
        }
        ok.then_some((out, span))
    }

    fn non_empty_inputs(&mut self, key: &'static str, slot: Slot, example: &str) -> Vec<Input> {
        match self.inputs(key, slot) {
            Some((v, span)) if v.is_empty() => {
                self.bad_value(
                    span,
                    format!("`{key}` is empty"),
                    "nothing listed",
                    format!("list at least one, e.g. `{key}: {example}`"),
                );
                v
            }
            Some((v, _)) => v,
            None => {
                if self.get(key).is_none() {
                    self.missing(key, example);
                }
                Vec::new()
            }
        }
    }
}

/// Decodes one node. Returns `None` when anything was wrong (the problems are in `diags`).
pub(crate) fn decode(mut f: Fields<'_>) -> Option<NodeParams> {
    let before = f.diags.len();
    let params = match f.kind {
        "svd_merge" => NodeParams::SvdMerge(svd_merge(&mut f)),
        "merge" => NodeParams::Merge(merge(&mut f)),
        "resize" => NodeParams::Resize(resize(&mut f)),
        "command" => NodeParams::Command(command(&mut f)),
        "train" => NodeParams::Train(train(&mut f)),
        "xy_plot" => NodeParams::XyPlot(xy_plot(&mut f)),
        "evaluate" => NodeParams::Evaluate(evaluate(&mut f)),
        "merge_into_model" => NodeParams::MergeIntoModel(merge_into_model(&mut f)),
        other => unreachable!("kind `{other}` was checked against KINDS"),
    };
    (f.diags.len() == before).then_some(params)
}

/// `models` + `ratios`, checked to have the same length.
fn models_and_ratios(f: &mut Fields<'_>) -> (Vec<Input>, Vec<f64>) {
    let models = f.non_empty_inputs("models", Slot::Lora, "[big, small]");
    let models_span = f.get("models").map(|y| y.span);
    let ratios = match f.numbers("ratios") {
        Some((r, span)) => {
            if let Some(ms) = models_span
                && !models.is_empty()
                && r.len() != models.len()
            {
                f.diags.push(
                    Diag::new(
                        "recipe::ratio_count",
                        format!("{} models but {} ratios", models.len(), r.len()),
                        span,
                        format!("{} ratios", r.len()),
                    )
                    .with_label(ms, format!("{} models", models.len()))
                    .help("give one ratio per model, in the same order"),
                );
            }
            r
        }
        None => {
            if f.get("ratios").is_none() {
                f.missing("ratios", "[1.5, -1.5]");
            }
            Vec::new()
        }
    };
    (models, ratios)
}

fn svd_merge(f: &mut Fields<'_>) -> SvdMergeParams {
    let (models, ratios) = models_and_ratios(f);
    let new_rank = f.count_or("new_rank", 4, 1);
    let new_conv_rank = f.count_or("new_conv_rank", new_rank, 1);
    let precision = f.precision("precision").unwrap_or(Precision::Float);
    let save_precision = f.precision("save_precision").unwrap_or(precision);
    let clamp_quantile = match f.entries.iter().find(|e| e.key == "clamp_quantile") {
        Some(e) if matches!(e.value.value, Value::Null) => None,
        Some(_) => match f.number("clamp_quantile") {
            Some((q, _)) if q > 0.0 && q <= 1.0 => Some(q),
            Some((q, span)) => {
                f.bad_value(
                    span,
                    format!("`clamp_quantile` must be in (0, 1], found {q}"),
                    "out of range",
                    "kohya's value is 0.99; `null` disables the clamp".into(),
                );
                Some(0.99)
            }
            None => Some(0.99),
        },
        None => Some(0.99),
    };
    SvdMergeParams {
        models,
        ratios,
        new_rank,
        new_conv_rank,
        precision,
        save_precision,
        clamp_quantile,
    }
}

fn merge(f: &mut Fields<'_>) -> MergeParams {
    let (models, ratios) = models_and_ratios(f);
    let save_precision = f.precision("save_precision").unwrap_or(Precision::Float);
    MergeParams {
        models,
        ratios,
        save_precision,
    }
}

/// `base` + `models` + `ratios`; `save_precision` absent keeps each tensor's dtype.
fn merge_into_model(f: &mut Fields<'_>) -> MergeIntoModelParams {
    let base = f.input("base", Slot::Model);
    if base.is_none() && f.get("base").is_none() {
        f.missing("base", "path/to/model.safetensors");
    }
    let (models, ratios) = models_and_ratios(f);
    let save_precision = f.precision("save_precision");
    MergeIntoModelParams {
        base: base.unwrap_or(Input::Node(String::new())),
        models,
        ratios,
        save_precision,
    }
}

fn resize(f: &mut Fields<'_>) -> ResizeParams {
    let model = f.input("model", Slot::Lora);
    if model.is_none() && f.get("model").is_none() {
        f.missing("model", "slider");
    }
    let new_rank = f.count_or("new_rank", 4, 1);
    let new_conv_rank = f.count_or("new_conv_rank", new_rank, 1);
    let method = f.choice("dynamic_method", &["sv_ratio", "sv_fro", "sv_cumulative"]);
    let param = f.number("dynamic_param");
    let dynamic_method = method.map(|(m, _)| match m {
        "sv_ratio" => DynamicMethod::SvRatio,
        "sv_fro" => DynamicMethod::SvFro,
        _ => DynamicMethod::SvCumulative,
    });
    match (method, param) {
        (Some((m, span)), None) if f.get("dynamic_param").is_none() => f.bad_value(
            span,
            format!("`dynamic_method: {m}` needs a `dynamic_param`"),
            "no `dynamic_param` given",
            "add e.g. `dynamic_param: 0.75`".into(),
        ),
        (None, Some((_, span))) if f.get("dynamic_method").is_none() => f.bad_value(
            span,
            "`dynamic_param` has no effect without `dynamic_method`".into(),
            "unused",
            "add `dynamic_method: sv_fro` (or sv_ratio, sv_cumulative), or remove this key".into(),
        ),
        (Some(("sv_ratio", _)), Some((p, span))) if p <= 0.0 => f.bad_value(
            span,
            format!("`dynamic_param` for sv_ratio must be positive, found {p}"),
            "out of range",
            "sv_ratio keeps singular values above S[0] / dynamic_param, e.g. 10".into(),
        ),
        (Some((m, _)), Some((p, span))) if m != "sv_ratio" && !(p > 0.0 && p <= 1.0) => f
            .bad_value(
                span,
                format!("`dynamic_param` for {m} must be in (0, 1], found {p}"),
                "out of range",
                "it is the fraction of the spectrum to keep, e.g. 0.75".into(),
            ),
        _ => {}
    }
    let rule = f.choice("rank_rule", &["one-past-threshold", "reach-threshold"]);
    let rank_rule = match rule {
        Some(("reach-threshold", _)) => RankRule::ReachThreshold,
        _ => RankRule::OnePastThreshold,
    };
    if let (Some((r, span)), None) = (rule, method)
        && f.get("dynamic_method").is_none()
    {
        f.bad_value(
            span,
            format!("`rank_rule: {r}` has no effect without `dynamic_method`"),
            "unused",
            "the rule picks a dynamic rank; add `dynamic_method: sv_fro` (or sv_ratio, sv_cumulative), or remove this key".into(),
        );
    }
    let save_precision = f.precision("save_precision").unwrap_or(Precision::Float);
    ResizeParams {
        model: model.unwrap_or(Input::Node(String::new())),
        new_rank,
        new_conv_rank,
        dynamic_method,
        dynamic_param: param.map(|(p, _)| p),
        rank_rule,
        save_precision,
    }
}

fn is_placeholder_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn command(f: &mut Fields<'_>) -> CommandParams {
    let mut run = Vec::new();
    let mut run_items = Vec::new();
    match f.list("run", "a list like [python, script.py, \"{out}\"]") {
        Some((items, span)) => {
            if items.is_empty() {
                f.bad_value(
                    span,
                    "`run` is empty".into(),
                    "no program",
                    "the first element is the program to run".into(),
                );
            }
            for item in items {
                match item.value.scalar_text() {
                    Some(t) => {
                        run.push(t);
                        run_items.push(item);
                    }
                    None => f.type_error("run", &item, "a list of strings", "a word like `--flag`"),
                }
            }
        }
        None => {
            if f.get("run").is_none() {
                f.missing("run", "[python, script.py, \"{out}\"]");
            }
        }
    }
    let mut inputs = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    if let Some(y) = f.get("inputs").cloned() {
        match &y.value {
            Value::Map(entries) => {
                for e in entries {
                    if !is_placeholder_name(&e.key) {
                        f.bad_value(
                            e.key_span,
                            format!("`{}` is not a valid input name", e.key),
                            "letters, digits and `_` only",
                            "it is used as `{name}` in `run`".into(),
                        );
                        continue;
                    }
                    if let Some(i) = f.input_at("inputs", &e.value, Slot::Any) {
                        inputs.insert(e.key.clone(), i);
                    }
                    names.push(e.key.clone());
                }
            }
            _ => f.type_error("inputs", &y, "a mapping", "`inputs: {lora: slider}`"),
        }
    }
    let mut outputs = Vec::new();
    match f.get("outputs").cloned() {
        Some(y) => match &y.value {
            Value::Map(entries) if !entries.is_empty() => {
                for e in entries {
                    let file = e.value.value.scalar_text().unwrap_or_default();
                    let bad_file = file.is_empty()
                        || file == "."
                        || file == ".."
                        || file.contains('/')
                        || file.contains('\\');
                    if !is_placeholder_name(&e.key) {
                        f.bad_value(
                            e.key_span,
                            format!("`{}` is not a valid output name", e.key),
                            "letters, digits and `_` only",
                            "it is used as `{name}` in `run`".into(),
                        );
                    } else if names.contains(&e.key) {
                        f.bad_value(
                            e.key_span,
                            format!("`{}` is both an input and an output", e.key),
                            "already an input",
                            "rename one of them".into(),
                        );
                    } else if bad_file {
                        f.bad_value(
                            e.value.span,
                            format!("`{file}` is not a plain file name"),
                            "not a file name",
                            "outputs are files the command writes in its own output directory, \
                             e.g. `out.safetensors`"
                                .into(),
                        );
                    } else {
                        names.push(e.key.clone());
                        outputs.push((e.key.clone(), file));
                    }
                }
            }
            _ => f.type_error(
                "outputs",
                &y,
                "a non-empty mapping of name to file name",
                "`outputs: {lora: out.safetensors}`",
            ),
        },
        None => f.missing("outputs", "{lora: out.safetensors}"),
    }
    for (arg, item) in run.iter().zip(&run_items) {
        let lookup = |name: &str| names.iter().any(|n| n == name).then(String::new);
        if let Err(unknown) = substitute_placeholders(arg, lookup) {
            let help = match closest(&unknown, names.iter().map(String::as_str)) {
                Some(c) => format!("did you mean `{{{c}}}`?"),
                None if names.is_empty() => "declare it under `inputs:` or `outputs:`".into(),
                None => format!(
                    "declare it under `inputs:` or `outputs:` (declared: {}); write `{{{{` for a \
                     literal brace",
                    names.join(", ")
                ),
            };
            f.bad_value(
                item.span,
                format!("unknown placeholder `{{{unknown}}}`"),
                "not a declared input or output",
                help,
            );
        }
    }
    CommandParams {
        run,
        inputs,
        outputs,
    }
}

fn train(f: &mut Fields<'_>) -> TrainParams {
    let (trainer, trainer_span) = f
        .named("trainer", &Trainer::names(), Trainer::from_name)
        .map_or((Trainer::Burn, None), |(t, span)| (t, Some(span)));
    // sd-scripts implements what the burn trainer refuses (text encoders, mixed precision,
    // gradient checkpointing), and lacks what only ours has (`base_config`).
    let by_sd_scripts = trainer == Trainer::SdScripts;
    let base = f.input("base", Slot::Model);
    if base.is_none() && f.get("base").is_none() {
        f.missing("base", "path/to/model.safetensors");
    }
    let base_config = f.input("base_config", Slot::Config);
    if by_sd_scripts && let Some(span) = f.get("base_config").map(|y| y.span) {
        f.diags.push(
            Diag::new(
                "recipe::not_in_trainer",
                "`base_config` is not a parameter of sd-scripts",
                span,
                "sd-scripts has no such option",
            )
            .help(
                "remove `base_config` (here or at the recipe's top level) for this node, \
                 or train it with `trainer: burn`",
            ),
        );
    }
    let sd_scripts = sd_scripts_install(f, by_sd_scripts, trainer_span);
    let images = f.non_empty_inputs("images", Slot::Image, "[pairs/small.png]");
    let caption = f.text_or("caption", "");
    let learning_rate = f.positive_f64_or("learning_rate", 2e-6);
    let unet_lr = f.opt_f64("unet_lr");
    let train_batch_size = f.count_or("train_batch_size", 1, 1);
    let max_train_steps = f.count_or("max_train_steps", 1600, 1);
    let network_dim = f.count_or("network_dim", 4, 1);
    let network_alpha = f.f64_or("network_alpha", 1.0);
    let conv_dim = f.opt_count("conv_dim");
    let conv_alpha = f.opt_f64("conv_alpha");
    let network_train_unet_only = f.bool_or("network_train_unet_only", false);
    let warmup = f.whole("lr_warmup_steps");
    let lr_warmup_steps = warmup.map_or(0, |(w, _)| w as usize);
    let schedulers = LrScheduler::names();
    let lr_scheduler = match f.named("lr_scheduler", &schedulers, LrScheduler::from_name) {
        Some((LrScheduler::Constant, span)) if lr_warmup_steps > 0 => {
            let d = Diag::new(
                "recipe::bad_value",
                "`lr_warmup_steps` needs a scheduler with warmup, but `lr_scheduler` is `constant`",
                span,
                "no warmup in this scheduler",
            )
            .help(
                "use `lr_scheduler: constant_with_warmup` (kohya refuses warmup with `constant`), \
                 or remove `lr_warmup_steps`",
            );
            let d = match warmup {
                Some((_, ws)) => d.with_label(ws, "warmup asked for here"),
                None => d,
            };
            f.diags.push(d);
            LrScheduler::Constant
        }
        Some((s, _)) => s,
        None if lr_warmup_steps > 0 => LrScheduler::ConstantWithWarmup,
        None => LrScheduler::Constant,
    };
    let optimizer_type = match f.get("optimizer_type") {
        Some(y) if matches!(&y.value, Value::Str(s) if s.is_empty()) => Optimizer::AdamW,
        _ => f
            .named("optimizer_type", &Optimizer::names(), Optimizer::from_name)
            .map_or(Optimizer::AdamW, |(c, _)| c),
    };
    let optimizer_args = optimizer_args(f);
    let seed = f.whole("seed").map_or(0, |(s, _)| s);
    let resolution = f.count_or("resolution", 512, 64);
    let noise_offset = f.f64_or("noise_offset", 0.0);
    let min_snr_gamma = f.opt_f64("min_snr_gamma");
    let mixed_precision = f
        .named(
            "mixed_precision",
            &MixedPrecision::names(),
            MixedPrecision::from_name,
        )
        .map_or(MixedPrecision::No, |(p, _)| p);
    // Only a half `mixed_precision` has a VAE to keep in f32: the flag changes nothing (and
    // so not the key) under `no`.
    let no_half_vae = f.bool_or("no_half_vae", false) && mixed_precision != MixedPrecision::No;
    let gradient_checkpointing = f.bool_or("gradient_checkpointing", false);
    // Refused when absent or `false`; a value of the wrong type already has its error.
    let unet_only_span = match f.get("network_train_unet_only") {
        _ if by_sd_scripts => None,
        None => Some(f.node_span),
        Some(y) if matches!(y.value, Value::Bool(false)) => Some(y.span),
        Some(_) => None,
    };
    if let Some(span) = unet_only_span {
        f.not_implemented(
            span,
            format!(
                "`train` node `{}` would train the text encoders, which is not implemented",
                f.node
            ),
            "kohya's default `network_train_unet_only: false` trains them",
            "add `network_train_unet_only: true` (the method's setting: text encoders frozen)",
        );
    }
    let save_precision = f.precision("save_precision").unwrap_or(Precision::Float);
    let checkpoint_every = f.count_or("checkpoint_every", 100, 1);
    let training_comment = f.text_or("training_comment", "");
    TrainParams {
        base: base.unwrap_or(Input::Node(String::new())),
        base_config,
        images,
        caption,
        learning_rate,
        unet_lr,
        train_batch_size,
        max_train_steps,
        network_dim,
        network_alpha,
        conv_dim,
        conv_alpha,
        network_train_unet_only,
        lr_scheduler,
        lr_warmup_steps,
        optimizer_type,
        optimizer_args,
        seed,
        resolution,
        noise_offset,
        min_snr_gamma,
        mixed_precision,
        no_half_vae,
        gradient_checkpointing,
        save_precision,
        checkpoint_every,
        training_comment,
        trainer,
        sd_scripts,
    }
}

/// Where the sd-scripts checkout named by `sd_scripts` (or `SLIDER_SD_SCRIPTS`) is, and the
/// Python that runs it: `sd_scripts_python`, `SLIDER_SD_SCRIPTS_PYTHON`, the checkout's
/// `venv/bin/python`, or `python3` on PATH, the first that is given. Both keys are refused
/// on a node that sd-scripts does not train (they would do nothing).
fn sd_scripts_install(
    f: &mut Fields<'_>,
    by_sd_scripts: bool,
    trainer_span: Option<Span>,
) -> Option<SdScriptsInstall> {
    let checkout = f.text("sd_scripts");
    let python = f.text("sd_scripts_python");
    if !by_sd_scripts {
        for (key, given) in [("sd_scripts", &checkout), ("sd_scripts_python", &python)] {
            if let Some((_, span)) = given {
                f.bad_value(
                    *span,
                    format!("`{key}` is used only by `trainer: sd-scripts`"),
                    "this node is trained by burn",
                    format!("remove `{key}`, or add `trainer: sd-scripts`"),
                );
            }
        }
        return None;
    }
    let at = trainer_span.unwrap_or(f.node_span);
    let (checkout, span) = match checkout {
        Some((text, span)) => (normalize(&f.resolver.root.join(text)), span),
        None => {
            match std::env::var_os(SD_SCRIPTS_ENV) {
                Some(dir) if !dir.is_empty() => (PathBuf::from(dir), at),
                _ => {
                    f.diags.push(
                    Diag::new(
                        "recipe::missing_key",
                        format!("`train` node `{}` is trained by sd-scripts, but no checkout is named", f.node),
                        at,
                        "sd-scripts asked for here",
                    )
                    .help(format!(
                        "add `sd_scripts: path/to/sd-scripts` or set {SD_SCRIPTS_ENV} \
                         (docs/sd-scripts.md)"
                    )),
                );
                    return None;
                }
            }
        }
    };
    if !checkout.join("train_network.py").is_file() {
        f.bad_value(
            span,
            format!("`{}` is not an sd-scripts checkout", checkout.display()),
            "no train_network.py there",
            format!(
                "name the folder of a kohya-ss/sd-scripts clone (`sd_scripts:` or {SD_SCRIPTS_ENV})"
            ),
        );
        return None;
    }
    let python = match python {
        Some((text, span)) if text.contains('/') => {
            let path = normalize(&f.resolver.root.join(&text));
            if !path.is_file() {
                f.bad_value(
                    span,
                    format!("no Python at `{text}`"),
                    "no such file",
                    "name the `python` of the environment that has sd-scripts' requirements".into(),
                );
                return None;
            }
            path
        }
        Some((text, _)) => PathBuf::from(text),
        None => match std::env::var_os(SD_SCRIPTS_PYTHON_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ if checkout.join("venv/bin/python").is_file() => checkout.join("venv/bin/python"),
            _ => PathBuf::from("python3"),
        },
    };
    Some(SdScriptsInstall { checkout, python })
}

/// The environment variable naming the sd-scripts checkout when a recipe does not.
pub const SD_SCRIPTS_ENV: &str = "SLIDER_SD_SCRIPTS";
/// The environment variable naming the Python that runs sd-scripts.
pub const SD_SCRIPTS_PYTHON_ENV: &str = "SLIDER_SD_SCRIPTS_PYTHON";

/// kohya takes `--optimizer_args key=value ...`; a recipe may write that list or a mapping.
fn optimizer_args(f: &mut Fields<'_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(y) = f.get("optimizer_args").cloned() else {
        return out;
    };
    match &y.value {
        Value::Map(entries) => {
            for e in entries {
                match e.value.value.scalar_text() {
                    Some(t) => {
                        out.insert(e.key.clone(), t);
                    }
                    None => f.type_error(&e.key, &e.value, "a single value", "e.g. `0.01`"),
                }
            }
        }
        Value::Seq(items) => {
            for item in items {
                match item
                    .value
                    .scalar_text()
                    .as_deref()
                    .and_then(|t| t.split_once('='))
                {
                    Some((k, v)) if !k.trim().is_empty() => {
                        out.insert(k.trim().to_owned(), v.trim().to_owned());
                    }
                    _ => f.type_error(
                        "optimizer_args",
                        item,
                        "a list of `key=value` strings",
                        "e.g. \"weight_decay=0.01\"",
                    ),
                }
            }
        }
        _ => f.type_error(
            "optimizer_args",
            &y,
            "a mapping or a list of `key=value`",
            "`optimizer_args: {weight_decay: 0.01}`",
        ),
    }
    out
}

fn axis(f: &mut Fields<'_>, key: &'static str) -> Option<(Axis, Span)> {
    let y = f.get(key)?.clone();
    let entries = match &y.value {
        Value::Map(e) if e.len() == 1 => e.clone(),
        _ => {
            f.type_error(
                key,
                &y,
                "a mapping with one axis",
                "e.g. `{weight: [-2, -1, 0, 1, 2]}` (axes: weight, seed, prompt, lora)",
            );
            return None;
        }
    };
    let e = &entries[0];
    let Value::Seq(items) = &e.value.value else {
        f.type_error(key, &e.value, "a list of values", "e.g. `[1, 2, 3]`");
        return None;
    };
    if items.is_empty() {
        f.bad_value(
            e.value.span,
            format!("the `{}` axis is empty", e.key),
            "no values",
            "list at least one value".into(),
        );
        return None;
    }
    let before = f.diags.len();
    let axis = match e.key.as_str() {
        "weight" => Axis::Weight(
            items
                .iter()
                .filter_map(|i| match i.value {
                    Value::Int(v) => Some(v as f64),
                    Value::Float(v) if v.is_finite() => Some(v),
                    _ => {
                        f.type_error("weight", i, "a number", "a LoRA weight like -1.5");
                        None
                    }
                })
                .collect(),
        ),
        "seed" => Axis::Seed(
            items
                .iter()
                .filter_map(|i| match i.value {
                    Value::Int(v) if v >= 0 => Some(v as u64),
                    _ => {
                        f.type_error("seed", i, "a whole number", "a seed like 42");
                        None
                    }
                })
                .collect(),
        ),
        "prompt" => Axis::Prompt(
            items
                .iter()
                .filter_map(|i| match i.value.scalar_text() {
                    Some(t) => Some(t),
                    None => {
                        f.type_error("prompt", i, "a string", "a prompt");
                        None
                    }
                })
                .collect(),
        ),
        "lora" => Axis::Lora(
            items
                .iter()
                .map(|i| match i.value {
                    Value::Null => None,
                    _ => f.input_at("lora", i, Slot::Lora),
                })
                .collect(),
        ),
        other => {
            let help = match closest(other, AXES) {
                Some(c) => format!("did you mean `{c}`?"),
                None => "axes: weight, seed, prompt, lora".into(),
            };
            f.diags.push(
                Diag::new(
                    "recipe::bad_value",
                    format!("unknown axis `{other}`"),
                    e.key_span,
                    "not an axis",
                )
                .help(help),
            );
            return None;
        }
    };
    (f.diags.len() == before).then_some((axis, e.key_span))
}

fn axis_name(a: &Axis) -> &'static str {
    match a {
        Axis::Weight(_) => "weight",
        Axis::Seed(_) => "seed",
        Axis::Prompt(_) => "prompt",
        Axis::Lora(_) => "lora",
    }
}

fn xy_plot(f: &mut Fields<'_>) -> XyPlotParams {
    let base = f.input("base", Slot::Model);
    if base.is_none() && f.get("base").is_none() {
        f.missing("base", "path/to/model.safetensors");
    }
    let base_config = f.input("base_config", Slot::Config);
    let loras = f
        .inputs("loras", Slot::Lora)
        .map_or_else(Vec::new, |(l, _)| l);
    let prompt = match f.text("prompt") {
        Some((p, _)) => p,
        None => {
            if f.get("prompt").is_none() {
                f.missing("prompt", "\"1girl, best quality\"");
            }
            String::new()
        }
    };
    let negative_prompt = f.text_or("negative_prompt", "");
    let x = axis(f, "x");
    if x.is_none() && f.get("x").is_none() {
        f.missing("x", "{weight: [-2, -1, 0, 1, 2]}");
    }
    let y = axis(f, "y");
    for (a, span) in [&x, &y].into_iter().flatten() {
        if matches!(a, Axis::Weight(_)) && loras.is_empty() {
            f.bad_value(
                *span,
                "a `weight` axis needs a LoRA to weigh".into(),
                "varies the weight of the first of `loras`",
                "add `loras: [your_lora]`".into(),
            );
        }
    }
    if let (Some((xa, _)), Some((ya, yspan))) = (&x, &y)
        && axis_name(xa) == axis_name(ya)
    {
        f.bad_value(
            *yspan,
            format!("`x` and `y` both vary `{}`", axis_name(ya)),
            "same axis as `x`",
            "vary something else on `y`, e.g. `{seed: [1, 2, 3]}`".into(),
        );
    }
    let steps = f.count_or("steps", 20, 1);
    let cfg_scale = f.f64_or("cfg_scale", 7.0);
    let sampler = f
        .named("sampler", &Sampler::names(), Sampler::from_name)
        .map_or(Sampler::EulerA, |(c, _)| c);
    let width = image_size(f, "width");
    let height = image_size(f, "height");
    let cell_scale = cell_scale(f, width.min(height));
    XyPlotParams {
        base: base.unwrap_or(Input::Node(String::new())),
        base_config,
        loras,
        prompt,
        negative_prompt,
        x: x.map_or(Axis::Seed(vec![0]), |(a, _)| a),
        y: y.map_or(Axis::Seed(vec![0]), |(a, _)| a),
        steps,
        cfg_scale,
        sampler,
        width,
        height,
        cell_scale,
    }
}

/// The smallest cell side a grid is drawn at unless `cell_scale` says otherwise.
pub(crate) const LEGIBLE_CELL_PX: usize = 192;

/// The largest `cell_scale`.
const MAX_CELL_SCALE: usize = 16;

/// `cell_scale`: by default the smallest whole factor that draws cells at least
/// [`LEGIBLE_CELL_PX`] on their shorter side.
fn cell_scale(f: &mut Fields<'_>, shorter_side: usize) -> u32 {
    let legible = LEGIBLE_CELL_PX.div_ceil(shorter_side.max(1)).max(1);
    let v = f.count_or("cell_scale", legible, 1);
    match f.get("cell_scale").map(|y| y.span) {
        Some(span) if v > MAX_CELL_SCALE => {
            f.bad_value(
                span,
                format!("`cell_scale` must be at most {MAX_CELL_SCALE}, found {v}"),
                "too large",
                format!("{legible} draws these cells at {LEGIBLE_CELL_PX} px or more"),
            );
            1
        }
        _ => u32::try_from(v).unwrap_or(1),
    }
}

/// A sample's `width` or `height`: a multiple of 8, default 512.
fn image_size(f: &mut Fields<'_>, key: &str) -> usize {
    let v = f.count_or(key, 512, 8);
    match f.get(key).map(|y| y.span) {
        Some(span) if !v.is_multiple_of(8) => {
            f.bad_value(
                span,
                format!("`{key}` must be a multiple of 8, found {v}"),
                "not a multiple of 8",
                format!("try {}", v.next_multiple_of(8)),
            );
            512
        }
        _ => v,
    }
}

/// `evaluate`'s default LoRA weights: the method's -2..2 with the small steps near 0.
pub(crate) const EVALUATE_WEIGHTS: [f64; 7] = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0];

fn evaluate(f: &mut Fields<'_>) -> EvaluateParams {
    let base = f.input("base", Slot::Model);
    if base.is_none() && f.get("base").is_none() {
        f.missing("base", "path/to/model.safetensors");
    }
    let base_config = f.input("base_config", Slot::Config);
    let lora = f.input("lora", Slot::Lora);
    if lora.is_none() && f.get("lora").is_none() {
        f.missing("lora", "eyesize");
    }
    let meter = f.input("meter", Slot::Meter);
    if meter.is_none() && f.get("meter").is_none() {
        f.missing("meter", "../assets/eye-meter/eye-meter.safetensors");
    }
    let weights = match f.numbers("weights") {
        Some((w, span)) if !w.contains(&0.0) => {
            f.bad_value(
                span,
                "`weights` must include 0".into(),
                "no 0 in this list",
                "weight 0 (the base model) is the reference for the change outside the eyes; \
                 add it, e.g. `[-2, -1, 0, 1, 2]`"
                    .into(),
            );
            w
        }
        Some((w, span)) if w.iter().all(|v| *v == 0.0) => {
            f.bad_value(
                span,
                "`weights` must vary".into(),
                "only 0 here",
                "the correlation of eye size with weight needs at least two weights, \
                 e.g. `[-2, -1, 0, 1, 2]`"
                    .into(),
            );
            w
        }
        Some((w, _)) => w,
        None => EVALUATE_WEIGHTS.to_vec(),
    };
    let seeds = match f.list("seeds", "a list of seeds like [1, 2, 3]") {
        Some((items, span)) => {
            let mut out = Vec::new();
            for item in &items {
                match item.value {
                    Value::Int(v) if v >= 0 => out.push(v as u64),
                    _ => f.type_error("seeds", item, "a list of whole numbers", "a seed like 42"),
                }
            }
            if items.is_empty() {
                f.bad_value(
                    span,
                    "`seeds` is empty".into(),
                    "nothing listed",
                    "list at least one seed, e.g. `seeds: [1, 2, 3, 4]`".into(),
                );
            }
            out
        }
        None => (1..=8).collect(),
    };
    let prompts = match f.list("prompts", "a list of prompts like [\"1girl, front view\"]") {
        Some((items, span)) => {
            let mut out = Vec::new();
            for item in &items {
                match (&item.value, item.value.scalar_text()) {
                    (Value::Seq(_) | Value::Map(_), _) | (_, None) => {
                        f.type_error("prompts", item, "a list of strings", "a prompt")
                    }
                    (_, Some(t)) => out.push(t),
                }
            }
            if items.is_empty() {
                f.bad_value(
                    span,
                    "`prompts` is empty".into(),
                    "nothing listed",
                    "list at least one prompt, e.g. `prompts: [\"1girl, side view\"]`".into(),
                );
            }
            out
        }
        None => {
            if f.get("prompts").is_none() {
                f.missing("prompts", "[\"1girl, front view\", \"1girl, side view\"]");
            }
            Vec::new()
        }
    };
    let negative_prompt = f.text_or("negative_prompt", "");
    let steps = f.count_or("steps", 20, 1);
    let cfg_scale = f.f64_or("cfg_scale", 7.0);
    let sampler = f
        .named("sampler", &Sampler::names(), Sampler::from_name)
        .map_or(Sampler::EulerA, |(c, _)| c);
    let width = image_size(f, "width");
    let height = image_size(f, "height");
    EvaluateParams {
        base: base.unwrap_or(Input::Node(String::new())),
        base_config,
        lora: lora.unwrap_or(Input::Node(String::new())),
        meter: meter.unwrap_or(Input::Node(String::new())),
        weights,
        seeds,
        prompts,
        negative_prompt,
        steps,
        cfg_scale,
        sampler,
        width,
        height,
    }
}

/// What a decoded node's primary output is.
pub(crate) fn produces(p: &NodeParams) -> Produces {
    match p {
        NodeParams::Train(_)
        | NodeParams::SvdMerge(_)
        | NodeParams::Merge(_)
        | NodeParams::Resize(_) => Produces::Lora,
        NodeParams::XyPlot(_) => Produces::Image,
        NodeParams::Evaluate(_) => Produces::OtherFile,
        NodeParams::MergeIntoModel(_) => Produces::Model,
        NodeParams::Command(c) => {
            let file = c
                .outputs
                .first()
                .map_or("", |(_, f)| f.as_str())
                .to_lowercase();
            if file.ends_with(".safetensors") {
                Produces::Lora
            } else if [".png", ".jpg", ".jpeg", ".webp"]
                .iter()
                .any(|e| file.ends_with(e))
            {
                Produces::Image
            } else {
                Produces::OtherFile
            }
        }
    }
}

/// Whether a node of `kind` producing `what` may feed `slot`; `None` if yes, else why not.
pub(crate) fn slot_refusal(slot: Slot, kind: &str, what: Produces) -> Option<&'static str> {
    match (slot, what) {
        (Slot::Any, _) => None,
        (Slot::Lora, Produces::Lora) => None,
        (Slot::Lora, Produces::Model) => Some(
            "a merge_into_model node makes a checkpoint, not a LoRA: feed it to `base`, or feed \
             this slot a node of kind train, svd_merge, merge or resize",
        ),
        (Slot::Lora, _) => Some(
            "feed it a node of kind train, svd_merge, merge or resize, or a command whose first \
             output ends in `.safetensors`",
        ),
        (Slot::Model, Produces::Model) => None,
        (Slot::Model, _) if kind == "command" && what != Produces::Image => None,
        (Slot::Model, _) => Some(
            "`base` takes a model checkpoint: a file, a merge_into_model node, or a command \
                 node that writes one",
        ),
        (Slot::Config, _) if kind == "command" && what != Produces::Image => None,
        (Slot::Config, _) => Some(
            "`base_config` takes a diffusers config.json: a file, or a command node that writes \
             one",
        ),
        (Slot::Meter, _) if kind == "command" && what != Produces::Image => None,
        (Slot::Meter, _) => {
            Some("`meter` takes the eye meter's weights: a file, or a command node that writes one")
        }
        (Slot::Image, Produces::Image) => None,
        (Slot::Image, _) => Some(
            "`images` takes image files, or a node that writes an image (`.png`, `.jpg`, `.webp`)",
        ),
    }
}

//! Every name a recipe accepts for a choice (optimizers, schedulers, samplers, precisions) is
//! a value of one enum here. The recipe offers exactly `ALL`, the worker matches on the enum,
//! so a name cannot be accepted on one side and unknown on the other.

use serde::{Deserialize, Serialize};

/// Declares a choice enum: its variants with the names recipes and files use for them
/// (serde writes the same names, so keys are unchanged from the string form).
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in the order messages list them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name as recipes write it.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The value of a name, matched case-insensitively (`adamw`, `AdamW`).
            pub fn from_name(text: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.name().eq_ignore_ascii_case(text))
            }

            /// Every name, as recipes write them.
            pub fn names() -> Vec<&'static str> {
                Self::ALL.iter().map(|v| v.name()).collect()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

choice! {
    /// `optimizer_type`: kohya's names.
    Optimizer {
        AdamW = "AdamW",
        Came = "CAME",
    }
}

choice! {
    /// `lr_scheduler`: kohya's / diffusers' schedules.
    LrScheduler {
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        Linear = "linear",
        Cosine = "cosine",
        CosineWithRestarts = "cosine_with_restarts",
        Polynomial = "polynomial",
    }
}

choice! {
    /// `mixed_precision`: the dtype frozen weights are held and computed in.
    MixedPrecision {
        No = "no",
        Fp16 = "fp16",
        Bf16 = "bf16",
    }
}

choice! {
    /// `trainer`: which program trains a `train` node.
    #[derive(Default)]
    Trainer {
        /// Ours: the worker's trainer on burn (the default, and the embedded path).
        #[default]
        Burn = "burn",
        /// The user's kohya-ss/sd-scripts checkout, run by the engine as a child program.
        SdScripts = "sd-scripts",
    }
}

impl Trainer {
    /// Whether this is the default trainer (which stays out of serialized parameters, so
    /// the keys of nodes written before the choice existed do not change).
    pub fn is_default(&self) -> bool {
        *self == Trainer::default()
    }
}

choice! {
    /// `sampler`: the samplers of `xy_plot` and `evaluate` (diffusers' schedulers).
    Sampler {
        Ddim = "ddim",
        Euler = "euler",
        /// Euler ancestral.
        EulerA = "euler_a",
        /// DPM++ 2M with Karras sigmas.
        Dpmpp2m = "dpmpp_2m",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each value's serialised form is its recipe name and reads back as itself, so what a
    /// recipe says is what the worker receives.
    fn round_trips<T>(
        all: &[T],
        name: impl Fn(&T) -> &'static str,
        from: impl Fn(&str) -> Option<T>,
    ) where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug + Copy,
    {
        for v in all {
            let json = serde_json::to_string(v).unwrap();
            assert_eq!(json, format!("\"{}\"", name(v)));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), *v);
            assert_eq!(from(&name(v).to_uppercase()), Some(*v));
        }
        assert_eq!(from("no such name"), None);
    }

    #[test]
    fn every_choice_serialises_as_its_recipe_name_and_back() {
        round_trips(Optimizer::ALL, |v| v.name(), Optimizer::from_name);
        round_trips(LrScheduler::ALL, |v| v.name(), LrScheduler::from_name);
        round_trips(MixedPrecision::ALL, |v| v.name(), MixedPrecision::from_name);
        round_trips(Sampler::ALL, |v| v.name(), Sampler::from_name);
        round_trips(Trainer::ALL, |v| v.name(), Trainer::from_name);
        assert_eq!(Optimizer::names(), ["AdamW", "CAME"]);
    }
}

//! Booru-style captions of rendered characters, in the tag vocabulary of the recipes' prompts
//! ("1girl, solo, upper body, looking at viewer"). The eye size is deliberately not captioned:
//! a base model trained on these captions then draws the whole range of eye sizes for any
//! prompt, and only the slider controls it.

use crate::identity::Identity;
use crate::render::View;

/// The caption of `identity` seen from `view`, e.g.
/// `1girl, solo, upper body, front view, looking at viewer, red hair, long hair, blue eyes,
/// white shirt, pale skin, simple background, pink background`.
///
/// `eye_size` is accepted so callers describe a render with the same three values they drew
/// it with; it does not change the caption (see the module documentation).
pub fn caption(identity: &Identity, view: View, eye_size: f32) -> String {
    let _ = eye_size;
    let mut tags: Vec<String> = vec!["1girl".into(), "solo".into(), "upper body".into()];
    tags.extend(view_tags(view).iter().map(|t| t.to_string()));
    tags.push(format!("{} hair", identity.hair_colour.tag()));
    tags.push(identity.hair_style.tag().into());
    tags.push(format!("{} eyes", identity.eye_colour.tag()));
    tags.push(format!("{} shirt", identity.clothes.tag()));
    if !identity.skin.tag().is_empty() {
        tags.push(identity.skin.tag().into());
    }
    tags.push("simple background".into());
    tags.push(format!("{} background", identity.background.tag()));
    tags.join(", ")
}

/// The tags that name a view.
pub fn view_tags(view: View) -> &'static [&'static str] {
    match view {
        View::Front => &["front view", "looking at viewer"],
        View::Deg45 => &["three-quarter view"],
        View::Side => &["side view", "profile"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{
        Background, ClothesColour, EyeColour, HairColour, HairStyle, Identity, Skin,
    };

    fn red_long() -> Identity {
        Identity {
            face_width: 1.0,
            jaw: 0.2,
            hair_style: HairStyle::Long,
            hair_colour: HairColour::Red,
            eye_colour: EyeColour::Blue,
            skin: Skin::Pale,
            clothes: ClothesColour::White,
            background: Background::Pink,
        }
    }

    #[test]
    fn captions_name_identity_and_view() {
        let cases = [
            (
                View::Front,
                "1girl, solo, upper body, front view, looking at viewer, red hair, long hair, \
                 blue eyes, white shirt, pale skin, simple background, pink background",
            ),
            (
                View::Deg45,
                "1girl, solo, upper body, three-quarter view, red hair, long hair, blue eyes, \
                 white shirt, pale skin, simple background, pink background",
            ),
            (
                View::Side,
                "1girl, solo, upper body, side view, profile, red hair, long hair, blue eyes, \
                 white shirt, pale skin, simple background, pink background",
            ),
        ];
        for (view, expected) in cases {
            assert_eq!(caption(&red_long(), view, 0.5), expected, "{view}");
        }
    }

    #[test]
    fn every_sampled_caption_mentions_hair_colour_and_view() {
        for seed in 0..100 {
            let id = Identity::from_seed(seed);
            for view in View::ALL {
                let text = caption(&id, view, 0.3);
                assert!(
                    text.contains(&format!("{} hair", id.hair_colour.tag())),
                    "{text}"
                );
                assert!(text.contains(view_tags(view)[0]), "{text}");
                assert!(!text.contains(",,") && !text.contains(", ,"), "{text}");
            }
        }
    }

    #[test]
    fn eye_size_is_not_captioned() {
        let id = red_long();
        assert_eq!(caption(&id, View::Side, 0.0), caption(&id, View::Side, 1.0));
    }
}

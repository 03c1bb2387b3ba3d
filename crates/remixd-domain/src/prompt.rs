//! Prompt expansion (`expand_prompt`): remixd's own deterministic step for the local
//! engines. It appends a composition phrase and a lighting phrase chosen from the
//! prompt's words, and a quality phrase chosen by the style, skipping any phrase whose
//! key word the prompt already has. The same prompt and style always give the same text.

use crate::Style;

/// Word lists → phrase; the first list with a word in the prompt wins.
type Rule = (&'static [&'static str], &'static str);

const COMPOSITION: &[Rule] = &[
    (
        &["portrait", "face", "headshot", "close-up", "closeup"],
        "close-up portrait, shallow depth of field",
    ),
    (
        &[
            "man",
            "woman",
            "person",
            "people",
            "girl",
            "boy",
            "child",
            "astronaut",
            "knight",
            "character",
            "hero",
            "warrior",
            "robot",
        ],
        "full-body shot of the character, centred composition",
    ),
    (
        &[
            "landscape",
            "mountain",
            "mountains",
            "city",
            "forest",
            "beach",
            "street",
            "valley",
            "ocean",
            "desert",
        ],
        "wide establishing shot, rule of thirds",
    ),
];

const LIGHTING: &[Rule] = &[
    (
        &["night", "moon", "moonlight", "dark"],
        "soft moonlight, deep shadows",
    ),
    (&["sunset", "sunrise", "dusk", "dawn"], "golden hour light"),
    (
        &[
            "kitchen", "room", "cafe", "café", "office", "bar", "studio", "indoors",
        ],
        "warm interior lighting",
    ),
];

const DEFAULT_COMPOSITION: &str = "balanced composition";
const DEFAULT_LIGHTING: &str = "soft natural light";

/// The expanded prompt.
pub fn expand(prompt: &str, style: Style) -> String {
    let words: Vec<String> = prompt
        .split(|c: char| !(c.is_alphanumeric() || c == '-'))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let has = |w: &str| words.iter().any(|x| x == w);
    let pick = |rules: &[Rule], default: &'static str| {
        rules
            .iter()
            .find(|(keys, _)| keys.iter().any(|k| has(k)))
            .map_or(default, |(_, phrase)| phrase)
    };
    let quality = match style {
        Style::Realistic => "photorealistic, fine detail",
        Style::Fiction => "detailed illustration, clean line work",
        Style::Auto => "high quality, detailed",
    };
    let mut out = prompt.trim().to_owned();
    for phrase in [
        pick(COMPOSITION, DEFAULT_COMPOSITION),
        pick(LIGHTING, DEFAULT_LIGHTING),
        quality,
    ] {
        // A phrase whose first word the prompt already uses adds nothing new.
        let lead = phrase.split([' ', ',']).next().unwrap_or_default();
        if !has(lead) {
            out.push_str(", ");
            out.push_str(phrase);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_follow_the_prompt_and_the_style() {
        let e = expand("an astronaut having coffee in a kitchen", Style::Realistic);
        assert_eq!(
            e,
            "an astronaut having coffee in a kitchen, full-body shot of the character, \
             centred composition, warm interior lighting, photorealistic, fine detail"
        );
        let e = expand("A quiet mountain village at NIGHT", Style::Fiction);
        assert!(
            e.contains("wide establishing shot") && e.contains("moonlight"),
            "{e}"
        );
        assert!(e.ends_with("detailed illustration, clean line work"), "{e}");
        let e = expand("  a cup  ", Style::Auto);
        assert_eq!(
            e,
            "a cup, balanced composition, soft natural light, high quality, detailed"
        );
    }

    #[test]
    fn expansion_is_deterministic_and_keeps_the_prompt_first() {
        for p in ["", "a portrait at sunset", "robot, street, dusk", "x"] {
            for s in [Style::Auto, Style::Realistic, Style::Fiction] {
                let a = expand(p, s);
                assert_eq!(a, expand(p, s));
                assert!(a.starts_with(p.trim()));
            }
        }
    }

    #[test]
    fn a_phrase_the_prompt_already_leads_with_is_skipped() {
        let e = expand("photorealistic portrait of a sailor", Style::Realistic);
        assert!(!e.contains("photorealistic, fine detail"), "{e}");
        assert!(e.contains("close-up portrait"), "{e}");
    }
}

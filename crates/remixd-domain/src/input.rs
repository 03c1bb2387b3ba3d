//! The validated input of a character-remix task, and the rules that make it valid.
//!
//! Each constructor enforces one rule of the contract and answers a [`RuleError`]
//! whose text completes the sentence "`<field>` …", so the api crate can name the
//! offending field in its message.

use serde::{Deserialize, Serialize};

/// The only model remixd serves.
pub const MODEL_NAME: &str = "ideogram/character-remix";
/// Longest prompt, in characters.
pub const PROMPT_MAX_CHARS: usize = 5000;
/// Longest negative prompt, in characters.
pub const NEGATIVE_PROMPT_MAX_CHARS: usize = 500;
/// Longest callback URL, in characters.
pub const CALLBACK_URL_MAX_CHARS: usize = 2048;
/// Largest seed.
pub const SEED_MAX: u32 = 2_147_483_647;

/// Why a value broke its rule; the text follows the field name in a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(pub String);

fn rule(msg: impl Into<String>) -> RuleError {
    RuleError(msg.into())
}

/// `rendering_speed`: picks the engine preset and the price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum RenderingSpeed {
    Turbo,
    #[default]
    Balanced,
    Quality,
}

impl RenderingSpeed {
    pub const NAMES: &'static str = "TURBO, BALANCED or QUALITY";
    pub fn parse(s: &str) -> Result<Self, RuleError> {
        match s {
            "TURBO" => Ok(Self::Turbo),
            "BALANCED" => Ok(Self::Balanced),
            "QUALITY" => Ok(Self::Quality),
            _ => Err(rule(format!("must be one of {}", Self::NAMES))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Turbo => "TURBO",
            Self::Balanced => "BALANCED",
            Self::Quality => "QUALITY",
        }
    }
}

/// `style`: the look of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Style {
    #[default]
    Auto,
    Realistic,
    Fiction,
}

impl Style {
    pub const NAMES: &'static str = "AUTO, REALISTIC or FICTION";
    pub fn parse(s: &str) -> Result<Self, RuleError> {
        match s {
            "AUTO" => Ok(Self::Auto),
            "REALISTIC" => Ok(Self::Realistic),
            "FICTION" => Ok(Self::Fiction),
            _ => Err(rule(format!("must be one of {}", Self::NAMES))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "AUTO",
            Self::Realistic => "REALISTIC",
            Self::Fiction => "FICTION",
        }
    }
}

/// `image_size`: one of six presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImageSize {
    Square,
    #[default]
    SquareHd,
    Portrait4_3,
    Portrait16_9,
    Landscape4_3,
    Landscape16_9,
}

impl ImageSize {
    pub const ALL: [ImageSize; 6] = [
        Self::Square,
        Self::SquareHd,
        Self::Portrait4_3,
        Self::Portrait16_9,
        Self::Landscape4_3,
        Self::Landscape16_9,
    ];
    pub const NAMES: &'static str =
        "square, square_hd, portrait_4_3, portrait_16_9, landscape_4_3 or landscape_16_9";

    pub fn parse(s: &str) -> Result<Self, RuleError> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| rule(format!("must be one of {}", Self::NAMES)))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Square => "square",
            Self::SquareHd => "square_hd",
            Self::Portrait4_3 => "portrait_4_3",
            Self::Portrait16_9 => "portrait_16_9",
            Self::Landscape4_3 => "landscape_4_3",
            Self::Landscape16_9 => "landscape_16_9",
        }
    }

    /// Width × height in pixels.
    pub fn dimensions(self) -> (u32, u32) {
        match self {
            Self::Square => (512, 512),
            Self::SquareHd => (1024, 1024),
            Self::Portrait4_3 => (768, 1024),
            Self::Portrait16_9 => (576, 1024),
            Self::Landscape4_3 => (1024, 768),
            Self::Landscape16_9 => (1024, 576),
        }
    }
}

/// `num_images`: 1..=4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct NumImages(u8);

impl NumImages {
    pub fn new(n: i64) -> Result<Self, RuleError> {
        if (1..=4).contains(&n) {
            Ok(Self(n as u8))
        } else {
            Err(rule("must be between 1 and 4"))
        }
    }
    pub fn get(self) -> u32 {
        self.0 as u32
    }
}

impl Default for NumImages {
    fn default() -> Self {
        Self(1)
    }
}

impl TryFrom<u8> for NumImages {
    type Error = RuleError;
    fn try_from(n: u8) -> Result<Self, RuleError> {
        Self::new(n as i64)
    }
}

impl From<NumImages> for u8 {
    fn from(n: NumImages) -> u8 {
        n.0
    }
}

/// `seed`: 0..=2147483647.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Seed(u32);

impl Seed {
    pub fn new(n: i64) -> Result<Self, RuleError> {
        if (0..=SEED_MAX as i64).contains(&n) {
            Ok(Self(n as u32))
        } else {
            Err(rule(format!("must be between 0 and {SEED_MAX}")))
        }
    }
    /// A seed from any 32 random bits (the top bit is dropped).
    pub fn from_bits(bits: u32) -> Self {
        Self(bits & SEED_MAX)
    }
    pub fn get(self) -> u32 {
        self.0
    }
    /// The seed of image `i` of a task: seed + i, as ENGINES.md says.
    pub fn for_image(self, i: u32) -> u64 {
        self.0 as u64 + i as u64
    }
}

impl TryFrom<u32> for Seed {
    type Error = RuleError;
    fn try_from(n: u32) -> Result<Self, RuleError> {
        Self::new(n as i64)
    }
}

impl From<Seed> for u32 {
    fn from(s: Seed) -> u32 {
        s.0
    }
}

/// `strength`: 0.1..=1.0, how strongly the base image shapes the result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Strength(f64);

impl Strength {
    pub fn new(x: f64) -> Result<Self, RuleError> {
        if x.is_finite() && (0.1..=1.0).contains(&x) {
            Ok(Self(x))
        } else {
            Err(rule("must be between 0.1 and 1"))
        }
    }
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for Strength {
    fn default() -> Self {
        Self(0.8)
    }
}

impl TryFrom<f64> for Strength {
    type Error = RuleError;
    fn try_from(x: f64) -> Result<Self, RuleError> {
        Self::new(x)
    }
}

impl From<Strength> for f64 {
    fn from(s: Strength) -> f64 {
        s.0
    }
}

/// Checks that `s` is an absolute http or https URL without userinfo, of at most `max` chars.
pub fn check_http_url(s: &str, max: usize) -> Result<url::Url, RuleError> {
    if s.chars().count() > max {
        return Err(rule(format!("must be at most {max} characters")));
    }
    let u = url::Url::parse(s).map_err(|_| rule("must be an http or https URL"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none_or(str::is_empty) {
        return Err(rule("must be an http or https URL"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(rule("must not contain a user name or password"));
    }
    Ok(u)
}

/// Checks a prompt-like text: at least `min`, at most `max` characters.
pub fn check_text(s: &str, min: usize, max: usize) -> Result<(), RuleError> {
    let n = s.chars().count();
    if n < min || n > max {
        if min == 0 {
            return Err(rule(format!("must be at most {max} characters")));
        }
        return Err(rule(format!("must be {min} to {max} characters")));
    }
    Ok(())
}

/// Everything an engine needs to know about a task, valid by construction.
///
/// Stored with the task (as JSON, internally) so a worker on any node can run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInput {
    pub prompt: String,
    pub image_url: String,
    /// The first of `reference_image_urls`; the rest are ignored.
    pub reference_image_url: String,
    pub reference_mask_url: Option<String>,
    /// `image_urls`: style reference images.
    pub style_image_urls: Vec<String>,
    pub rendering_speed: RenderingSpeed,
    pub style: Style,
    pub expand_prompt: bool,
    pub image_size: ImageSize,
    pub num_images: NumImages,
    /// Drawn at creation when the client gave none, so retries are deterministic.
    pub seed: Seed,
    pub strength: Strength,
    pub negative_prompt: String,
}

/// Credits per image for each rendering speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreditPrices {
    pub turbo: i64,
    pub balanced: i64,
    pub quality: i64,
}

impl Default for CreditPrices {
    fn default() -> Self {
        Self {
            turbo: 12,
            balanced: 18,
            quality: 24,
        }
    }
}

impl CreditPrices {
    /// The credits a task costs: the per-image price times the number of images.
    pub fn cost(&self, speed: RenderingSpeed, n: NumImages) -> i64 {
        let per = match speed {
            RenderingSpeed::Turbo => self.turbo,
            RenderingSpeed::Balanced => self.balanced,
            RenderingSpeed::Quality => self.quality,
        };
        per * n.get() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_match_the_contract_table() {
        let want = [
            ("square", 512, 512),
            ("square_hd", 1024, 1024),
            ("portrait_4_3", 768, 1024),
            ("portrait_16_9", 576, 1024),
            ("landscape_4_3", 1024, 768),
            ("landscape_16_9", 1024, 576),
        ];
        for (name, w, h) in want {
            assert_eq!(ImageSize::parse(name).unwrap().dimensions(), (w, h));
        }
        assert!(ImageSize::parse("huge").is_err());
    }

    #[test]
    fn default_costs() {
        let p = CreditPrices::default();
        assert_eq!(
            p.cost(RenderingSpeed::Turbo, NumImages::new(1).unwrap()),
            12
        );
        assert_eq!(
            p.cost(RenderingSpeed::Balanced, NumImages::new(1).unwrap()),
            18
        );
        assert_eq!(
            p.cost(RenderingSpeed::Quality, NumImages::new(4).unwrap()),
            96
        );
    }

    #[test]
    fn urls() {
        assert!(check_http_url("https://example.com/a.png", 2048).is_ok());
        assert!(check_http_url("http://127.0.0.1:9/a.png", 2048).is_ok());
        for bad in [
            "ftp://x/a",
            "file:///etc/passwd",
            "not a url",
            "https://u:p@example.com/",
            "http://",
        ] {
            assert!(check_http_url(bad, 2048).is_err(), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert!(check_http_url(&long, 2048).is_err());
    }

    proptest! {
        #[test]
        fn strength_accepts_exactly_its_range(x in -2.0f64..3.0) {
            prop_assert_eq!(Strength::new(x).is_ok(), (0.1..=1.0).contains(&x));
        }

        #[test]
        fn seed_accepts_exactly_its_range(n in -10i64..=4_294_967_400i64) {
            prop_assert_eq!(Seed::new(n).is_ok(), (0..=2_147_483_647).contains(&n));
        }

        #[test]
        fn prompt_length_is_counted_in_characters(n in 0usize..5010) {
            let s = "é".repeat(n);
            prop_assert_eq!(check_text(&s, 1, PROMPT_MAX_CHARS).is_ok(), (1..=5000).contains(&n));
        }
    }
}

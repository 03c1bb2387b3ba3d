//! createTask validation: the request body, as JSON, becomes a [`TaskInput`] once.
//!
//! Hand-written over `serde_json::Value` rather than derived, because every message must
//! name the field the way the contract does (`input.strength must be between 0.1 and
//! 1`), and because the contract accepts loose forms (`num_images` as `"2"` or `2`,
//! `reference_mask_urls` as a string or a list, `""` meaning "not given").

use remixd_domain::input::{
    check_http_url, check_text, CALLBACK_URL_MAX_CHARS, NEGATIVE_PROMPT_MAX_CHARS, PROMPT_MAX_CHARS,
};
use remixd_domain::{
    ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style, TaskInput, MODEL_NAME,
};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// URLs longer than this are refused (the common limit of browsers and CDNs).
pub const IMAGE_URL_MAX_CHARS: usize = 4096;
/// At most this many style images: each one is fetched and decoded.
pub const MAX_STYLE_IMAGES: usize = 10;

/// A validated createTask request.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub input: TaskInput,
    pub callback_url: Option<String>,
    /// The request as received, compact, for `param`.
    pub param: String,
}

fn bad(field: &str, rule: impl std::fmt::Display) -> ApiError {
    ApiError::validation(format!("{field} {rule}"))
}

/// A field that is absent, `null` or `""`: "not given".
fn given<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(v) => Some(v),
    }
}

fn string<'a>(v: &'a Value, field: &str) -> Result<&'a str, ApiError> {
    v.as_str().ok_or_else(|| bad(field, "must be a string"))
}

fn url_field(v: &Value, field: &str) -> Result<String, ApiError> {
    let s = string(v, field)?;
    check_http_url(s, IMAGE_URL_MAX_CHARS).map_err(|e| bad(field, e))?;
    Ok(s.to_string())
}

/// Parses and validates a createTask body. `seed` supplies a seed when the client gave none.
pub fn create_request(
    body: &[u8],
    draw_seed: impl FnOnce() -> u32,
) -> Result<CreateRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::validation(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(root) = &value else {
        return Err(ApiError::validation("request body must be a JSON object"));
    };

    match root.get("model") {
        None | Some(Value::Null) => return Err(ApiError::validation("model is required")),
        Some(Value::String(m)) if m == MODEL_NAME => {}
        Some(_) => return Err(bad("model", format!("must be {MODEL_NAME}"))),
    }

    let callback_url = match given(root, "callBackUrl") {
        None => None,
        Some(v) => {
            let s = string(v, "callBackUrl")?;
            check_http_url(s, CALLBACK_URL_MAX_CHARS).map_err(|e| bad("callBackUrl", e))?;
            Some(s.to_string())
        }
    };

    let input = match root.get("input") {
        None | Some(Value::Null) => return Err(ApiError::validation("input is required")),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(bad("input", "must be an object")),
    };

    let prompt = match input.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::validation("input.prompt is required")),
        Some(v) => string(v, "input.prompt")?,
    };
    check_text(prompt, 1, PROMPT_MAX_CHARS).map_err(|e| bad("input.prompt", e))?;

    let image_url = match given(input, "image_url") {
        None => return Err(ApiError::validation("input.image_url is required")),
        Some(v) => url_field(v, "input.image_url")?,
    };

    let reference_image_url = match input.get("reference_image_urls") {
        None | Some(Value::Null) => {
            return Err(ApiError::validation(
                "input.reference_image_urls is required",
            ))
        }
        Some(Value::Array(a)) => match a.first() {
            None => {
                return Err(bad(
                    "input.reference_image_urls",
                    "must contain at least one URL",
                ))
            }
            Some(first) => url_field(first, "input.reference_image_urls[0]")?,
        },
        Some(_) => {
            return Err(bad(
                "input.reference_image_urls",
                "must be an array of URLs",
            ))
        }
    };

    let rendering_speed = match given(input, "rendering_speed") {
        None => RenderingSpeed::default(),
        Some(v) => RenderingSpeed::parse(string(v, "input.rendering_speed")?)
            .map_err(|e| bad("input.rendering_speed", e))?,
    };
    let style = match given(input, "style") {
        None => Style::default(),
        Some(v) => Style::parse(string(v, "input.style")?).map_err(|e| bad("input.style", e))?,
    };
    let expand_prompt = match given(input, "expand_prompt") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("input.expand_prompt", "must be a boolean")),
    };
    let image_size = match given(input, "image_size") {
        None => ImageSize::default(),
        Some(v) => ImageSize::parse(string(v, "input.image_size")?)
            .map_err(|e| bad("input.image_size", e))?,
    };
    let num_images = match given(input, "num_images") {
        None => NumImages::default(),
        Some(Value::String(s)) => {
            let n: i64 = s
                .trim()
                .parse()
                .map_err(|_| bad("input.num_images", "must be between 1 and 4"))?;
            NumImages::new(n).map_err(|e| bad("input.num_images", e))?
        }
        Some(Value::Number(n)) => {
            let n = n
                .as_i64()
                .ok_or_else(|| bad("input.num_images", "must be between 1 and 4"))?;
            NumImages::new(n).map_err(|e| bad("input.num_images", e))?
        }
        Some(_) => return Err(bad("input.num_images", "must be between 1 and 4")),
    };
    let seed = match given(input, "seed") {
        None => Seed::from_bits(draw_seed()),
        Some(Value::Number(n)) => {
            let n = n
                .as_i64()
                .ok_or_else(|| bad("input.seed", "must be an integer"))?;
            Seed::new(n).map_err(|e| bad("input.seed", e))?
        }
        Some(_) => return Err(bad("input.seed", "must be an integer")),
    };
    let strength = match given(input, "strength") {
        None => Strength::default(),
        Some(Value::Number(n)) => {
            Strength::new(n.as_f64().unwrap_or(f64::NAN)).map_err(|e| bad("input.strength", e))?
        }
        Some(_) => return Err(bad("input.strength", "must be a number")),
    };
    let negative_prompt = match given(input, "negative_prompt") {
        None => String::new(),
        Some(v) => {
            let s = string(v, "input.negative_prompt")?;
            check_text(s, 0, NEGATIVE_PROMPT_MAX_CHARS)
                .map_err(|e| bad("input.negative_prompt", e))?;
            s.to_string()
        }
    };
    let style_image_urls = match given(input, "image_urls") {
        None => Vec::new(),
        Some(Value::Array(a)) => {
            if a.len() > MAX_STYLE_IMAGES {
                return Err(bad(
                    "input.image_urls",
                    format!("must have at most {MAX_STYLE_IMAGES} URLs"),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| url_field(v, &format!("input.image_urls[{i}]")))
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(bad("input.image_urls", "must be an array of URLs")),
    };
    let reference_mask_url = match given(input, "reference_mask_urls") {
        None => None,
        Some(Value::Array(a)) => match a.first() {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(v) => Some(url_field(v, "input.reference_mask_urls[0]")?),
        },
        Some(v @ Value::String(_)) => Some(url_field(v, "input.reference_mask_urls")?),
        Some(_) => {
            return Err(bad(
                "input.reference_mask_urls",
                "must be a URL or an array of URLs",
            ))
        }
    };

    Ok(CreateRequest {
        input: TaskInput {
            prompt: prompt.to_string(),
            image_url,
            reference_image_url,
            reference_mask_url,
            style_image_urls,
            rendering_speed,
            style,
            expand_prompt,
            image_size,
            num_images,
            seed,
            strength,
            negative_prompt,
        },
        callback_url,
        param: serde_json::to_string(&value).expect("a parsed value serialises"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model": "ideogram/character-remix",
            "input": {
                "prompt": "a cat astronaut",
                "image_url": "https://example.com/base.png",
                "reference_image_urls": ["https://example.com/ref.png"]
            }
        })
    }

    fn run(v: &Value) -> Result<CreateRequest, String> {
        create_request(v.to_string().as_bytes(), || 42).map_err(|e| e.to_string())
    }

    fn with(path: &str, val: Value) -> Value {
        let mut v = base();
        v["input"][path] = val;
        v
    }

    #[test]
    fn defaults() {
        let r = run(&base()).unwrap();
        let i = r.input;
        assert_eq!(i.rendering_speed, RenderingSpeed::Balanced);
        assert_eq!(i.style, Style::Auto);
        assert!(i.expand_prompt);
        assert_eq!(i.image_size, ImageSize::SquareHd);
        assert_eq!(i.num_images.get(), 1);
        assert_eq!(i.seed.get(), 42);
        assert_eq!(i.strength.get(), 0.8);
        assert_eq!(i.negative_prompt, "");
        assert!(i.style_image_urls.is_empty() && i.reference_mask_url.is_none());
        assert_eq!(r.callback_url, None);
        assert_eq!(serde_json::from_str::<Value>(&r.param).unwrap(), base());
    }

    #[test]
    fn loose_forms_are_accepted() {
        assert_eq!(
            run(&with("num_images", json!("3")))
                .unwrap()
                .input
                .num_images
                .get(),
            3
        );
        assert_eq!(
            run(&with("num_images", json!(4)))
                .unwrap()
                .input
                .num_images
                .get(),
            4
        );
        let m = run(&with("reference_mask_urls", json!("https://e.com/m.png"))).unwrap();
        assert_eq!(
            m.input.reference_mask_url.as_deref(),
            Some("https://e.com/m.png")
        );
        let m = run(&with(
            "reference_mask_urls",
            json!(["https://e.com/a.png", "https://e.com/b.png"]),
        ))
        .unwrap();
        assert_eq!(
            m.input.reference_mask_url.as_deref(),
            Some("https://e.com/a.png")
        );
        for empty in [json!(""), json!(null), json!([])] {
            assert!(run(&with("reference_mask_urls", empty))
                .unwrap()
                .input
                .reference_mask_url
                .is_none());
        }
        for empty_opt in [
            "rendering_speed",
            "style",
            "image_size",
            "negative_prompt",
            "num_images",
        ] {
            assert!(run(&with(empty_opt, json!(""))).is_ok(), "{empty_opt}");
        }
        let extra = run(&with("something_new", json!({"x": 1})));
        assert!(extra.is_ok(), "unknown fields are ignored");
        let rest = run(&with(
            "reference_image_urls",
            json!(["https://e.com/a.png", 7]),
        ))
        .unwrap();
        assert_eq!(rest.input.reference_image_url, "https://e.com/a.png");
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases: Vec<(Value, &str)> = vec![
            (json!([1, 2]), "request body must be a JSON object"),
            (json!({"input": {}}), "model is required"),
            (
                json!({"model": "other", "input": {}}),
                "model must be ideogram/character-remix",
            ),
            (
                json!({"model": "ideogram/character-remix"}),
                "input is required",
            ),
            (
                json!({"model": "ideogram/character-remix", "input": 3}),
                "input must be an object",
            ),
            (with("prompt", json!(null)), "input.prompt is required"),
            (
                with("prompt", json!("")),
                "input.prompt must be 1 to 5000 characters",
            ),
            (
                with("prompt", json!("x".repeat(5001))),
                "input.prompt must be 1 to 5000 characters",
            ),
            (with("prompt", json!(5)), "input.prompt must be a string"),
            (
                with("image_url", json!(null)),
                "input.image_url is required",
            ),
            (
                with("image_url", json!("ftp://e.com/a.png")),
                "input.image_url must be an http or https URL",
            ),
            (
                with("image_url", json!("https://u:p@e.com/a.png")),
                "input.image_url must not contain a user name or password",
            ),
            (
                with("reference_image_urls", json!(null)),
                "input.reference_image_urls is required",
            ),
            (
                with("reference_image_urls", json!([])),
                "input.reference_image_urls must contain at least one URL",
            ),
            (
                with("reference_image_urls", json!("https://e.com/a.png")),
                "input.reference_image_urls must be an array of URLs",
            ),
            (
                with("reference_image_urls", json!(["nope"])),
                "input.reference_image_urls[0] must be an http or https URL",
            ),
            (
                with("rendering_speed", json!("FAST")),
                "input.rendering_speed must be one of TURBO, BALANCED or QUALITY",
            ),
            (
                with("style", json!("ANIME")),
                "input.style must be one of AUTO, REALISTIC or FICTION",
            ),
            (
                with("expand_prompt", json!("yes")),
                "input.expand_prompt must be a boolean",
            ),
            (
                with("image_size", json!("huge")),
                "input.image_size must be one of",
            ),
            (
                with("num_images", json!("5")),
                "input.num_images must be between 1 and 4",
            ),
            (
                with("num_images", json!(0)),
                "input.num_images must be between 1 and 4",
            ),
            (
                with("num_images", json!(2.5)),
                "input.num_images must be between 1 and 4",
            ),
            (
                with("seed", json!(-1)),
                "input.seed must be between 0 and 2147483647",
            ),
            (
                with("seed", json!(2147483648i64)),
                "input.seed must be between 0 and 2147483647",
            ),
            (with("seed", json!(1.5)), "input.seed must be an integer"),
            (with("seed", json!("7")), "input.seed must be an integer"),
            (
                with("strength", json!(0.05)),
                "input.strength must be between 0.1 and 1",
            ),
            (
                with("strength", json!(1.01)),
                "input.strength must be between 0.1 and 1",
            ),
            (
                with("strength", json!("0.5")),
                "input.strength must be a number",
            ),
            (
                with("negative_prompt", json!("n".repeat(501))),
                "input.negative_prompt must be at most 500 characters",
            ),
            (
                with("image_urls", json!("https://e.com/s.png")),
                "input.image_urls must be an array of URLs",
            ),
            (
                with("image_urls", json!(["https://e.com/s.png", "bad"])),
                "input.image_urls[1] must be an http or https URL",
            ),
            (
                with("image_urls", json!(vec!["https://e.com/s.png"; 11])),
                "input.image_urls must have at most 10 URLs",
            ),
            (
                with("reference_mask_urls", json!(4)),
                "input.reference_mask_urls must be a URL or an array of URLs",
            ),
            (
                with("reference_mask_urls", json!(["x"])),
                "input.reference_mask_urls[0] must be an http or https URL",
            ),
        ];
        for (body, want) in cases {
            let got = run(&body).expect_err(&format!("{body} should fail"));
            assert!(got.starts_with(want), "{body}: got {got:?}, want {want:?}");
        }
        let mut cb = base();
        cb["callBackUrl"] = json!("javascript:alert(1)");
        assert_eq!(
            run(&cb).unwrap_err(),
            "callBackUrl must be an http or https URL"
        );
        cb["callBackUrl"] = json!(format!("https://e.com/{}", "a".repeat(2048)));
        assert_eq!(
            run(&cb).unwrap_err(),
            "callBackUrl must be at most 2048 characters"
        );
        cb["callBackUrl"] = json!("https://e.com/hook");
        assert_eq!(
            run(&cb).unwrap().callback_url.as_deref(),
            Some("https://e.com/hook")
        );
        assert!(run(&json!("x")).is_err());
        assert!(create_request(b"{not json", || 0)
            .unwrap_err()
            .to_string()
            .starts_with("request body is not valid JSON"));
    }

    /// Found by the `create_task` fuzz target: without exact float parsing an unknown
    /// field's `1.2555555555555556e+41` was stored in `param` as `…558e+41`, so the
    /// stored request was not what the client sent, and validating it again changed it.
    #[test]
    fn param_keeps_every_number_exactly() {
        let body = br#"{"model":"ideogram/character-remix","input":{"prompt":"p","image_url":"https://e.com/b.png","reference_image_urls":["https://e.com/r.png"],"s%2e":1.2555555555555556e+41,"strength":0.35}}"#;
        let first = create_request(body, || 7).unwrap();
        let stored: Value = serde_json::from_str(&first.param).unwrap();
        assert_eq!(
            stored["input"]["s%2e"].as_f64(),
            Some(1.2555555555555556e41)
        );
        let again = create_request(first.param.as_bytes(), || 7).unwrap();
        assert_eq!(again, first);
    }
}

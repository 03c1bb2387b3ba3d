//! createTask's body validation (`remixd_api::validate::create_request`) on arbitrary
//! bytes: it must never panic, must answer the same way twice, must name the field in
//! every refusal, and an accepted body's stored form (`param`) must validate to the
//! same request, since a task's `param` is what recordInfo shows of it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remixd_api::validate::{create_request, MAX_STYLE_IMAGES};
use remixd_domain::input::{NEGATIVE_PROMPT_MAX_CHARS, PROMPT_MAX_CHARS, SEED_MAX};

/// The seed drawn when the body gives none.
const DRAWN: u32 = 1_234_567;

/// How every refusal starts: the field it is about, or the body as a whole.
const FIELDS: [&str; 4] = ["request body", "model", "callBackUrl", "input"];

fuzz_target!(|body: &[u8]| {
    let first = create_request(body, || DRAWN);
    match (&first, &create_request(body, || DRAWN)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "two validations differ"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("one validation accepted, the other refused"),
    }
    let req = match first {
        Ok(req) => req,
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(e.code(), 422, "{msg}");
            assert!(FIELDS.iter().any(|f| msg.starts_with(f)), "{msg}");
            return;
        }
    };
    let input = &req.input;
    let chars = input.prompt.chars().count();
    assert!((1..=PROMPT_MAX_CHARS).contains(&chars), "prompt of {chars}");
    assert!(input.negative_prompt.chars().count() <= NEGATIVE_PROMPT_MAX_CHARS);
    assert!(input.style_image_urls.len() <= MAX_STYLE_IMAGES);
    assert!((1..=4).contains(&input.num_images.get()));
    assert!(input.seed.get() <= SEED_MAX);
    let strength = input.strength.get();
    assert!((0.1..=1.0).contains(&strength), "strength {strength}");
    // The stored form validates to the same request (and stores itself unchanged).
    let again = create_request(req.param.as_bytes(), || DRAWN)
        .unwrap_or_else(|e| panic!("param {} is refused: {e}", req.param));
    assert_eq!(again, req, "param {}", req.param);
    // A drawn seed is used only when the body gives none.
    let other = create_request(body, || DRAWN + 1).expect("accepted once");
    if other.input.seed != input.seed {
        assert_eq!(input.seed.get(), DRAWN);
        assert_eq!(other.input.seed.get(), DRAWN + 1);
    }
});

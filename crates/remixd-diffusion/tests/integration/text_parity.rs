//! The CLIP tokenizer and text encoder against the reference tensors of both tiny models
//! (tests/fixtures/README.md).
//!
//! Token ids must be equal. Embeddings must agree elementwise within
//! `|ours - reference| <= 1e-5 + 1e-4 * |reference|` (f32 on both sides; the SD 2.x
//! encoder's weights are f16 on disk, read into f32 as the reference does).

use crate::common;

use std::collections::HashMap;

use common::fixtures;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use remixd_diffusion::clip::{ClipTextConfig, ClipTextModel};
use remixd_diffusion::tokenizer::ClipTokenizer;
use serde_json::Value;

const MODELS: [&str; 2] = ["tiny-sd1", "tiny-sd2"];
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

struct Reference {
    tensors: HashMap<String, Tensor>,
    meta: Value,
}

fn reference(model: &str) -> Reference {
    Reference {
        tensors: common::reference(model),
        meta: common::sidecar(model),
    }
}

impl Reference {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name} missing"))
    }

    /// An i64 `[1, n]` id tensor as u32s.
    fn ids(&self, name: &str) -> Vec<u32> {
        self.tensor(name)
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| u32::try_from(v).expect("id fits u32"))
            .collect()
    }
}

/// Asserts `|got - want| <= ATOL + RTOL * |want|` everywhere, reporting the worst element.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let want = want.flatten_all().unwrap();
    let got = got.to_vec1::<f32>().unwrap();
    let want = want.to_vec1::<f32>().unwrap();
    let (mut worst, mut at) = (0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let excess = (g - w).abs() / (ATOL + RTOL * w.abs());
        if excess > worst || excess.is_nan() {
            worst = excess;
            at = i;
        }
    }
    assert!(
        worst <= 1.0,
        "{what}: element {at}: {} vs reference {} (tolerance {ATOL} + {RTOL} * |ref|)",
        got[at],
        want[at]
    );
}

#[test]
fn tokenizer_matches_every_reference_case() {
    for model in MODELS {
        let r = reference(model);
        let tok = ClipTokenizer::from_dir(&fixtures().join(model).join("tokenizer")).unwrap();
        let info = &r.meta["tokenizer"];
        assert_eq!(
            tok.model_max_length() as u64,
            info["model_max_length"].as_u64().unwrap()
        );
        assert_eq!(tok.pad_id() as u64, info["pad_token_id"].as_u64().unwrap());
        assert_eq!(tok.bos_id() as u64, info["bos_token_id"].as_u64().unwrap());
        assert_eq!(tok.eos_id() as u64, info["eos_token_id"].as_u64().unwrap());
        let cases = r.meta["tokenizer_cases"].as_array().unwrap();
        assert!(cases.len() >= 10, "{model}: too few tokenizer cases");
        for case in cases {
            let i = case["index"].as_u64().unwrap();
            let text = case["text"].as_str().unwrap();
            let want = r.ids(&format!("tok.{i}.ids"));
            let got = tok.encode(text).unwrap();
            assert_eq!(got, want, "{model}: tokenizer case {i} {text:?}");
        }
        let text = &r.meta["text"];
        for (key, name) in [("prompt", "prompt"), ("negative_prompt", "negative")] {
            let got = tok.encode(text[key].as_str().unwrap()).unwrap();
            assert_eq!(
                got,
                r.ids(&format!("text.{name}.ids")),
                "{model}: {key} ids"
            );
        }
    }
}

#[test]
fn text_encoder_matches_reference_embeddings() {
    for model in MODELS {
        let r = reference(model);
        let encoder =
            ClipTextModel::load(&fixtures().join(model).join("text_encoder"), &Device::Cpu)
                .unwrap();
        for name in ["prompt", "negative"] {
            let ids = r.tensor(&format!("text.{name}.ids"));
            let got = encoder.forward(ids).unwrap();
            assert_close(
                &format!("{model} text.{name}.embeds"),
                &got,
                r.tensor(&format!("text.{name}.embeds")),
            );
        }
        // A batch of both prompts gives the same rows as one prompt at a time.
        let batch = Tensor::cat(
            &[r.tensor("text.prompt.ids"), r.tensor("text.negative.ids")],
            0,
        )
        .unwrap();
        let got = encoder.forward_all(&batch).unwrap();
        let want = Tensor::cat(
            &[
                r.tensor("text.prompt.embeds"),
                r.tensor("text.negative.embeds"),
            ],
            0,
        )
        .unwrap();
        assert_close(
            &format!("{model} batched embeds"),
            &got.last_hidden_state,
            &want,
        );
        assert_eq!(
            got.hidden_states.len(),
            encoder.config().num_hidden_layers + 1
        );
    }
}

#[test]
fn weight_errors_name_the_tensor() {
    let dir = fixtures().join("tiny-sd1").join("text_encoder");
    let cfg = ClipTextConfig::load(&dir.join("config.json")).unwrap();
    let vb = || unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    // One layer more than the file has.
    let more = ClipTextConfig {
        num_hidden_layers: cfg.num_hidden_layers + 1,
        ..cfg.clone()
    };
    let err = ClipTextModel::new(vb(), &more).unwrap_err().to_string();
    let missing = format!("text_model.encoder.layers.{}", cfg.num_hidden_layers);
    assert!(err.contains(&missing), "{err}");
    // A width the file does not have.
    let wider = ClipTextConfig {
        intermediate_size: cfg.intermediate_size + 1,
        ..cfg
    };
    let err = ClipTextModel::new(vb(), &wider).unwrap_err().to_string();
    assert!(err.contains("fc1"), "{err}");
}

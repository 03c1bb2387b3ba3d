//! FLUX.2 [klein]'s text side against the reference of the tiny model
//! (tests/fixtures/README.md): the chat-template prompt encoder and the Qwen3 text
//! encoder.
//!
//! Every tokenizer case must give the reference's rendered text, ids and mask exactly.
//! Every hidden state and the prompt embeddings must agree within 1e-4 of the tensor's
//! scale (f32 on both sides; padding positions included, since the pipeline uses them).

use crate::common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::assert_close;
use remixd_diffusion::flux2::prompt::ChatPrompt;
use remixd_diffusion::flux2::qwen3::Qwen3TextEncoder;
use serde_json::Value;

const MODEL: &str = "tiny-flux2";
const RTOL: f32 = 1e-4;

fn dir(component: &str) -> PathBuf {
    common::model_dir(MODEL).join(component)
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("an integer")).expect("fits u32"))
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    u32s(v).into_iter().map(|x| x as usize).collect()
}

fn max_len(meta: &Value) -> usize {
    meta["max_sequence_length"]
        .as_u64()
        .expect("max_sequence_length") as usize
}

#[test]
fn tokenizer_cases_match_exactly() {
    let meta = common::sidecar(MODEL);
    let chat = ChatPrompt::from_dir(&dir("tokenizer")).unwrap();
    let cases = meta["tokenizer_cases"].as_array().expect("tokenizer_cases");
    assert!(!cases.is_empty());
    let max_len = max_len(&meta);
    let mut truncated = 0;
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            chat.render(prompt).unwrap(),
            case["text"].as_str().unwrap(),
            "{prompt:?}: text"
        );
        let (ids, mask) = chat.encode(prompt, max_len).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "{prompt:?}: ids");
        assert_eq!(mask, u32s(&case["mask"]), "{prompt:?}: mask");
        truncated += usize::from(mask.iter().all(|&m| m == 1));
    }
    assert!(truncated > 0, "a case reaches the length");
}

#[test]
fn hidden_states_and_prompt_embeddings_match() {
    let meta = common::sidecar(MODEL);
    let reference = common::reference(MODEL);
    let chat = ChatPrompt::from_dir(&dir("tokenizer")).unwrap();
    let layers = usizes(&meta["text_layers"]);
    let encoder =
        Qwen3TextEncoder::load(&dir("text_encoder"), &layers, DType::F32, &Device::Cpu).unwrap();
    let hidden = encoder.config().hidden_size;
    let depth = encoder.config().num_hidden_layers;
    let (ids, mask) = chat
        .encode(meta["prompt"].as_str().unwrap(), max_len(&meta))
        .unwrap();
    assert!(mask.contains(&0), "the prompt is padded");

    // Every hidden state on its own, the final-normed last one included.
    let all: Vec<usize> = (0..=depth).collect();
    let each = Qwen3TextEncoder::load(&dir("text_encoder"), &all, DType::F32, &Device::Cpu)
        .unwrap()
        .hidden_states(&ids, &mask)
        .unwrap();
    for k in all {
        let name = format!("text.hidden.{k}");
        let got = each.narrow(2, k * hidden, hidden).unwrap();
        assert_close(&name, &got, &reference[&name], RTOL);
    }

    let embeds = encoder.hidden_states(&ids, &mask).unwrap();
    assert_close("text.embeds", &embeds, &reference["text.embeds"], RTOL);

    // The negative prompt through the same path.
    if let (Some(negative), Some(want)) = (
        meta["negative_prompt"].as_str(),
        reference.get("text.negative.embeds"),
    ) {
        let (ids, mask) = chat.encode(negative, max_len(&meta)).unwrap();
        let got: Tensor = encoder.hidden_states(&ids, &mask).unwrap();
        assert_close("text.negative.embeds", &got, want, RTOL);
    }
}

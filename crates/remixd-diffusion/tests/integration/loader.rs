//! The diffusers-layout loader refuses what it cannot run with an error that says what
//! and where: a missing directory or file, PyTorch-only weights, an SDXL directory, a
//! weight of the wrong shape, a block type remixd does not implement.

use crate::common;

use std::path::Path;

use candle_core::Device;
use common::model_dir;
use remixd_diffusion::model::StableDiffusion;

/// A copy of a fixture model that a test may break.
fn copy_model(model: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&model_dir(model), tmp.path());
    tmp
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn load_err(dir: &Path) -> String {
    match StableDiffusion::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn both_fixture_models_load() {
    for m in ["tiny-sd1", "tiny-sd2"] {
        let sd = StableDiffusion::load(&model_dir(m), &Device::Cpu).expect(m);
        assert_eq!(sd.native_side(), 64, "{m}");
    }
}

#[test]
fn a_missing_directory_or_index_is_named() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model"), "{e}");
    let tmp = copy_model("tiny-sd1");
    std::fs::remove_file(tmp.path().join("model_index.json")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("missing file") && e.contains("model_index.json"),
        "{e}"
    );
}

#[test]
fn missing_weights_are_named_and_bin_weights_explained() {
    let tmp = copy_model("tiny-sd1");
    let unet = tmp.path().join("unet");
    std::fs::rename(
        unet.join("diffusion_pytorch_model.safetensors"),
        unet.join("diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains(".bin") && e.contains("safetensors"), "{e}");
    std::fs::remove_file(unet.join("diffusion_pytorch_model.bin")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("missing file") && e.contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );
}

#[test]
fn the_fp16_variant_file_is_found() {
    let tmp = copy_model("tiny-sd2");
    let unet = tmp.path().join("unet");
    std::fs::rename(
        unet.join("diffusion_pytorch_model.safetensors"),
        unet.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    StableDiffusion::load(tmp.path(), &Device::Cpu).expect("fp16 variant loads");
}

#[test]
fn sdxl_and_other_pipelines_are_refused_by_name() {
    let tmp = copy_model("tiny-sd1");
    let index = tmp.path().join("model_index.json");
    edit_json(&index, |v| {
        v["_class_name"] = "StableDiffusionXLPipeline".into();
        v["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
    });
    let e = load_err(tmp.path());
    assert!(e.contains("SDXL"), "{e}");
    edit_json(&index, |v| {
        v["_class_name"] = "KandinskyPipeline".into();
        v.as_object_mut().unwrap().remove("text_encoder_2");
    });
    let e = load_err(tmp.path());
    assert!(e.contains("KandinskyPipeline"), "{e}");
}

#[test]
fn a_weight_of_the_wrong_shape_names_the_tensor_and_the_component() {
    let tmp = copy_model("tiny-sd1");
    // A config that disagrees with the weights: a wider cross-attention.
    edit_json(&tmp.path().join("unet/config.json"), |v| {
        v["cross_attention_dim"] = 48.into();
    });
    let e = load_err(tmp.path());
    assert!(e.contains("unet"), "{e}");
    assert!(e.contains("shape"), "{e}");
}

#[test]
fn an_unimplemented_block_type_is_named() {
    let tmp = copy_model("tiny-sd1");
    edit_json(&tmp.path().join("unet/config.json"), |v| {
        v["down_block_types"][0] = "SimpleCrossAttnDownBlock2D".into();
    });
    let e = load_err(tmp.path());
    assert!(e.contains("SimpleCrossAttnDownBlock2D"), "{e}");
}

/// The family comes from the pipeline class; klein's components and settings are checked
/// before anything runs, with sentences naming what is wrong.
mod flux2 {
    use super::*;
    use remixd_diffusion::flux2::Flux2Klein;
    use remixd_diffusion::model::{family, Family};

    fn klein_err(dir: &Path, layers: &[usize]) -> String {
        match Flux2Klein::load(dir, layers, &Device::Cpu) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_family_is_read_from_the_pipeline_class() {
        assert_eq!(
            family(&model_dir("tiny-sd1")).unwrap(),
            Family::StableDiffusion
        );
        assert_eq!(
            family(&model_dir("tiny-flux2")).unwrap(),
            Family::Flux2Klein
        );
        let tmp = copy_model("tiny-flux2");
        let index = tmp.path().join("model_index.json");
        for class in ["Flux2KleinPipeline", "Flux2KleinInpaintPipeline"] {
            edit_json(&index, |v| v["_class_name"] = class.into());
            assert_eq!(family(tmp.path()).unwrap(), Family::Flux2Klein, "{class}");
        }
        edit_json(&index, |v| v["_class_name"] = "Flux2KleinKVPipeline".into());
        let e = family(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains("Flux2KleinKVPipeline") && e.contains("Flux2KleinInpaintPipeline"),
            "{e}"
        );
        // A Stable Diffusion loader given a klein directory says so.
        let e = load_err(&model_dir("tiny-flux2"));
        assert!(e.contains("FLUX.2"), "{e}");
    }

    #[test]
    fn text_layers_that_do_not_fit_the_transformer_are_refused() {
        let dir = model_dir("tiny-flux2");
        // The released models' layers: the tiny encoder has 2.
        let e = klein_err(&dir, &[9, 18, 27]);
        assert!(
            e.contains("hidden state 9") && e.contains("num_hidden_layers 2"),
            "{e}"
        );
        // Two layers give 32 features; the transformer reads 48.
        let e = klein_err(&dir, &[1, 2]);
        assert!(e.contains("48") && e.contains("32"), "{e}");
        assert!(Flux2Klein::load(&dir, &[0, 1, 2], &Device::Cpu).is_ok());
    }

    #[test]
    fn a_wrong_component_class_is_named() {
        let tmp = copy_model("tiny-flux2");
        edit_json(&tmp.path().join("model_index.json"), |v| {
            v["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"])
        });
        let e = klein_err(tmp.path(), &[0, 1, 2]);
        assert!(e.contains("vae") && e.contains("AutoencoderKLFlux2"), "{e}");
    }
}

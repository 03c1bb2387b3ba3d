//! Ideogram's remix request with a character reference: one synchronous multipart
//! `POST <base>/v1/ideogram-v3/remix` with the `Api-Key` header, the inputs sent as
//! files (remixd holds their bytes). The size preset becomes an aspect ratio; each
//! result is cover-cropped and resized to the preset's pixels, and the provider's own
//! size and seed are recorded. An image the provider flags unsafe fails the task (422).
//!
//! Ideogram gives no request id to resume: a worker killed during the request sends it
//! again on the next attempt.

use std::io::Cursor;

use image::{GrayImage, RgbImage};
use remixd_domain::{ImageSize, RenderingSpeed};
use remixd_engine::{EngineError, EngineImage, InputRole, ProviderImage, Source};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::http::{provider_message, CallError, Caller};
use crate::{download_result, GatewayConfig, Handle, Kind, ProviderConfig, Run};

pub const PATH: &str = "v1/ideogram-v3/remix";

/// The aspect ratio Ideogram is asked for, per size preset.
pub fn aspect_ratio(size: ImageSize) -> &'static str {
    match size {
        ImageSize::Square | ImageSize::SquareHd => "1x1",
        ImageSize::Portrait4_3 => "3x4",
        ImageSize::Portrait16_9 => "9x16",
        ImageSize::Landscape4_3 => "4x3",
        ImageSize::Landscape16_9 => "16x9",
    }
}

/// `rendering_speed` in Ideogram's words (BALANCED is its DEFAULT).
pub fn speed(s: RenderingSpeed) -> &'static str {
    match s {
        RenderingSpeed::Turbo => "TURBO",
        RenderingSpeed::Balanced => "DEFAULT",
        RenderingSpeed::Quality => "QUALITY",
    }
}

/// `strength` (0..1, how much of the base survives) as `image_weight` (1..=100).
pub fn image_weight(strength: f64) -> u32 {
    ((strength * 100.0).round() as i64).clamp(1, 100) as u32
}

/// The inputs sent as files, found once per task.
struct Files<'a> {
    base: &'a Source,
    character: &'a Source,
    /// The mask as Ideogram wants it ([`mask_for_reference`]).
    mask: Option<bytes::Bytes>,
}

pub struct Ideogram {
    caller: Caller,
    fetcher: remixd_fetch::Fetcher,
    max_result_bytes: u64,
}

impl Ideogram {
    pub fn new(cfg: ProviderConfig, gw: &GatewayConfig) -> Result<Self, String> {
        Ok(Self {
            caller: Caller::new("ideogram", cfg)?,
            fetcher: gw.fetcher.clone(),
            max_result_bytes: gw.max_result_bytes,
        })
    }

    fn url(&self) -> String {
        format!("{}/{PATH}", self.caller.cfg.base_url.trim_end_matches('/'))
    }

    /// The multipart form, built anew for each attempt.
    fn form(&self, run: &Run<'_>, files: &Files<'_>) -> Form {
        let job = run.job;
        let file = |s: &Source, name: &str| {
            // The fetch stage accepted only JPEG, PNG and WebP.
            let kind = remixd_fetch::sniff(&s.bytes).unwrap_or(remixd_fetch::ImageKind::Png);
            Part::stream(reqwest::Body::from(s.bytes.clone()))
                .file_name(format!("{name}.{}", kind.extension()))
                .mime_str(kind.mime())
                .expect("a valid mime type")
        };
        let mut form = Form::new()
            .part("image", file(files.base, "image"))
            .text("prompt", job.prompt.clone())
            .text("image_weight", image_weight(job.strength.get()).to_string())
            .text("seed", job.seed.get().to_string())
            .text("aspect_ratio", aspect_ratio(job.size))
            .text("rendering_speed", speed(job.rendering_speed))
            .text("magic_prompt", if job.expand_prompt { "ON" } else { "OFF" })
            .text("num_images", job.num_images.get().to_string())
            // The provider's own default is GENERAL: AUTO is sent explicitly.
            .text("style_type", job.style.as_str())
            .part(
                "character_reference_images",
                file(files.character, "character"),
            );
        if !job.negative_prompt.is_empty() {
            form = form.text("negative_prompt", job.negative_prompt.clone());
        }
        if let Some(m) = &files.mask {
            form = form.part(
                "character_reference_images_mask",
                Part::stream(reqwest::Body::from(m.clone()))
                    .file_name("mask.png")
                    .mime_str("image/png")
                    .expect("a valid mime type"),
            );
        }
        for (i, s) in run.sources(InputRole::Style).enumerate() {
            form = form.part("style_reference_images", file(s, &format!("style-{i}")));
        }
        form
    }

    fn refused(&self, status: reqwest::StatusCode, body: &[u8]) -> EngineError {
        let msg = provider_message(body).unwrap_or_else(|| status.to_string());
        let msg = self.caller.redact(&msg);
        match status.as_u16() {
            400 | 422 => EngineError::BadInput(format!("Ideogram refused the task: {msg}")),
            401 | 403 => EngineError::Unavailable(format!(
                "Ideogram refused the key (HTTP {}): check engine.ideogram.key",
                status.as_u16()
            )),
            s => EngineError::GenerationFailed(format!("Ideogram answered HTTP {s}: {msg}")),
        }
    }
}

/// The mask as Ideogram wants it: one channel, the character reference's size.
pub fn mask_for_reference(
    mask: &[u8],
    reference: &[u8],
    max_pixels: u64,
) -> Result<Vec<u8>, String> {
    let (_, w, h) = remixd_fetch::probe(reference, max_pixels)
        .map_err(|e| format!("the character reference {e}"))?;
    let m: GrayImage =
        remixd_fetch::decode_luma(mask, max_pixels).map_err(|e| format!("the mask {e}"))?;
    let m = if m.dimensions() == (w, h) {
        m
    } else {
        image::imageops::resize(&m, w, h, image::imageops::FilterType::Triangle)
    };
    let mut out = Vec::new();
    m.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| format!("encoding the mask: {e}"))?;
    Ok(out)
}

/// Cover-crops `img` to `w`×`h`'s aspect ratio around its centre and resizes it to
/// exactly `w`×`h`.
pub fn fit_to_preset(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (w, h) {
        return img.clone();
    }
    // The largest crop with the target's aspect ratio.
    let (cw, ch) = if iw as u64 * h as u64 > ih as u64 * w as u64 {
        (((ih as u64 * w as u64) / h as u64).max(1) as u32, ih)
    } else {
        (iw, ((iw as u64 * h as u64) / w as u64).max(1) as u32)
    };
    let crop = image::imageops::crop_imm(img, (iw - cw) / 2, (ih - ch) / 2, cw, ch).to_image();
    image::imageops::resize(&crop, w, h, image::imageops::FilterType::Lanczos3)
}

#[async_trait::async_trait]
impl crate::Provider for Ideogram {
    fn kind(&self) -> Kind {
        Kind::Ideogram
    }

    async fn run(
        &self,
        run: &mut Run<'_>,
        _resume: Option<Handle>,
    ) -> Result<Vec<EngineImage>, EngineError> {
        let max_pixels = self.fetcher.config().max_pixels;
        let (base, character) = (
            run.source(InputRole::Base)?,
            run.source(InputRole::Character)?,
        );
        let mask = match run.sources(InputRole::Mask).next() {
            Some(m) => {
                let (m, r) = (m.bytes.clone(), character.bytes.clone());
                let png =
                    tokio::task::spawn_blocking(move || mask_for_reference(&m, &r, max_pixels))
                        .await
                        .map_err(|e| EngineError::Internal(e.to_string()))?
                        .map_err(|e| {
                            EngineError::BadInput(format!("input.reference_mask_urls: {e}"))
                        })?;
                Some(bytes::Bytes::from(png))
            }
            None => None,
        };
        let files = Files {
            base,
            character,
            mask,
        };
        (run.progress)(10);
        let url = self.url();
        let a = self
            .caller
            .call(
                "remix",
                || {
                    self.caller
                        .client
                        .post(&url)
                        .header("Api-Key", &self.caller.cfg.key)
                        .multipart(self.form(run, &files))
                },
                run.deadline,
                run.cancel,
            )
            .await
            .map_err(|e| match e {
                CallError::Unavailable(m) => EngineError::Unavailable(format!("Ideogram: {m}")),
                CallError::Cancelled => EngineError::Cancelled,
                CallError::Deadline => EngineError::GenerationFailed(format!(
                    "Ideogram did not answer within {} s (engine.ideogram.task_timeout_s)",
                    self.caller.cfg.task_timeout.as_secs()
                )),
            })?;
        if !a.status.is_success() {
            return Err(self.refused(a.status, &a.body));
        }
        (run.progress)(80);
        let v = a.json().unwrap_or(Value::Null);
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let want = run.job.num_images.get() as usize;
        if data
            .iter()
            .any(|d| d.get("is_image_safe").and_then(Value::as_bool) == Some(false))
        {
            return Err(EngineError::BadInput(
                "Ideogram's safety check flagged the generated image, so it was not delivered; try another prompt or images".into(),
            ));
        }
        if data.len() != want {
            return Err(EngineError::GenerationFailed(format!(
                "Ideogram returned {} images, {want} were asked for",
                data.len()
            )));
        }
        let (w, h) = run.job.size.dimensions();
        let mut out = Vec::with_capacity(want);
        for (i, d) in data.iter().enumerate() {
            let Some(u) = d.get("url").and_then(Value::as_str) else {
                return Err(EngineError::GenerationFailed(format!(
                    "Ideogram's image {i} has no URL"
                )));
            };
            let img = download_result(
                &self.fetcher,
                "Ideogram",
                u,
                self.max_result_bytes,
                i,
                run.cancel,
                run.deadline,
            )
            .await?;
            let seed = d.get("seed").and_then(Value::as_u64);
            let (pw, ph) = (img.width, img.height);
            let resized = tokio::task::spawn_blocking(move || {
                remixd_fetch::decode_rgb(&img.bytes, max_pixels)
                    .map(|rgb| fit_to_preset(&rgb, w, h))
            })
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::GenerationFailed(format!("Ideogram's image {i} {e}")))?;
            let mut image = EngineImage::png(&resized);
            image.provider = Some(ProviderImage {
                provider: "ideogram".into(),
                width: pw,
                height: ph,
                seed,
            });
            (run.progress)(80 + (19 * (i + 1) / want) as u8);
            out.push(image);
        }
        Ok(out)
    }

    async fn cancel(&self, _h: &Handle) {}

    async fn check(&self) -> Result<String, String> {
        // A remix without an image: authenticated, refused before any generation.
        let form = Form::new().text("prompt", "remixd engines check");
        let req = self
            .caller
            .client
            .post(self.url())
            .header("Api-Key", &self.caller.cfg.key)
            .multipart(form);
        self.caller
            .check(req, "a request without an image; nothing generated")
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mappings_follow_engines_md() {
        assert_eq!(aspect_ratio(ImageSize::Square), "1x1");
        assert_eq!(aspect_ratio(ImageSize::SquareHd), "1x1");
        assert_eq!(aspect_ratio(ImageSize::Portrait4_3), "3x4");
        assert_eq!(aspect_ratio(ImageSize::Portrait16_9), "9x16");
        assert_eq!(aspect_ratio(ImageSize::Landscape4_3), "4x3");
        assert_eq!(aspect_ratio(ImageSize::Landscape16_9), "16x9");
        assert_eq!(speed(RenderingSpeed::Balanced), "DEFAULT");
        assert_eq!(speed(RenderingSpeed::Turbo), "TURBO");
        assert_eq!(speed(RenderingSpeed::Quality), "QUALITY");
        assert_eq!(image_weight(0.0), 1);
        assert_eq!(image_weight(0.456), 46);
        assert_eq!(image_weight(1.0), 100);
    }

    #[test]
    fn results_are_cover_cropped_to_the_preset() {
        // A 4:3-ish provider image into a 3:4 preset keeps the centre column.
        let mut img = RgbImage::new(400, 300);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([if (150..250).contains(&x) { 255 } else { 0 }, 0, 0]);
        }
        let out = fit_to_preset(&img, 150, 200);
        assert_eq!(out.dimensions(), (150, 200));
        assert!(out.get_pixel(75, 100)[0] > 200, "the centre survives");
        let same = fit_to_preset(&img, 400, 300);
        assert_eq!(same, img);
    }
}

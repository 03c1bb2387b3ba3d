//! Engines: what turns one validated, fetched task into images.
//!
//! Every engine receives the same [`Job`], whatever produced it, reports progress
//! through a [`Progress`] callback, watches a cancellation token, and answers either
//! one [`EngineImage`] per requested image or an [`EngineError`] of one of four kinds.
//! The worker crate decides what each kind means for the task (fail now, retry later).
//!
//! Each engine also says how much of each input it really uses ([`Engine::working_size`]):
//! the worker reduces every image to that size right after decoding it, so a task with
//! a dozen 36-megapixel inputs holds a dozen small images, not a dozen canvases.
//!
//! The engines here are the light ones; the local diffusion engine is its own crate.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use image::{GrayImage, RgbImage};
use remixd_domain::{ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style};
use tokio_util::sync::CancellationToken;

pub mod preview;

pub use preview::PreviewEngine;

/// One task, ready for an engine: decoded images and validated parameters.
#[derive(Clone)]
pub struct Job {
    /// The task id, for logs.
    pub task_id: String,
    /// The base image, decoded to RGB.
    pub base: RgbImage,
    /// The character reference, decoded to RGB.
    pub character: RgbImage,
    /// The character's mask, one channel, white = character.
    pub mask: Option<GrayImage>,
    /// Style reference images, decoded to RGB.
    pub style_images: Vec<RgbImage>,
    /// The prompt (already expanded where the engine wants that).
    pub prompt: String,
    pub negative_prompt: String,
    pub expand_prompt: bool,
    pub size: ImageSize,
    pub num_images: NumImages,
    pub seed: Seed,
    pub strength: Strength,
    pub style: Style,
    pub rendering_speed: RenderingSpeed,
    /// What an engine that calls a provider needs besides pixels (empty for the others).
    pub upstream: UpstreamJob,
}

/// The parts of a [`Job`] for engines that send the task to a provider
/// ([`Engine::wants_sources`]): the inputs as fetched, a URL for each that the provider
/// can read, and a way to record the provider's request so that a restarted worker
/// resumes it instead of submitting the task twice.
#[derive(Clone, Default)]
pub struct UpstreamJob {
    /// Every input, in the order base, character, mask, styles; empty unless the engine
    /// [wants sources](Engine::wants_sources).
    pub sources: Vec<Source>,
    /// The handle an earlier attempt recorded through `checkpoint`, if any.
    pub resume: Option<String>,
    /// Records a handle on the provider's request (never a secret) before the engine
    /// waits on it. `Err` means the task is no longer this worker's: stop.
    pub checkpoint: Option<Checkpoint>,
}

/// Stores an engine's handle on a provider request; see [`UpstreamJob::checkpoint`].
pub type Checkpoint = Arc<
    dyn Fn(
            String,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// One input image as the fetch stage stored it.
#[derive(Clone)]
pub struct Source {
    pub role: InputRole,
    /// The contract's field, for messages (`input.image_url`, …).
    pub field: String,
    /// A URL the provider can read: the client's own URL, or for a file of this server a
    /// signed link on `server.public_url`.
    pub url: String,
    /// The bytes exactly as fetched and checked.
    pub bytes: Bytes,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may be a signed link: a capability, kept out of logs.
        f.debug_struct("Source")
            .field("role", &self.role)
            .field("field", &self.field)
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("task_id", &self.task_id)
            .field("base", &self.base.dimensions())
            .field("character", &self.character.dimensions())
            .field("mask", &self.mask.as_ref().map(|m| m.dimensions()))
            .field("style_images", &self.style_images.len())
            .field("size", &self.size)
            .field("num_images", &self.num_images)
            .field("seed", &self.seed)
            .field("strength", &self.strength)
            .field("style", &self.style)
            .field("rendering_speed", &self.rendering_speed)
            .field("sources", &self.upstream.sources)
            .field("resume", &self.upstream.resume.is_some())
            .finish_non_exhaustive()
    }
}

/// One generated image, encoded.
#[derive(Debug, Clone)]
pub struct EngineImage {
    pub bytes: Bytes,
    /// `image/png`, `image/jpeg` or `image/webp`.
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    /// Where a provider made the image: its name and what it reported.
    pub provider: Option<ProviderImage>,
}

/// What a provider said about an image it made (recorded in the task's `resultJson`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderImage {
    /// The engine that served the task (`fal`, `ideogram`).
    pub provider: String,
    /// The image's size as the provider made it, before remixd resized it.
    pub width: u32,
    pub height: u32,
    /// The provider's seed for the image, when it reports one.
    pub seed: Option<u64>,
}

impl EngineImage {
    /// An image encoded as PNG (the same pixels always give the same bytes).
    pub fn png(img: &RgbImage) -> Self {
        Self {
            bytes: preview::encode_png(img),
            content_type: "image/png".to_owned(),
            width: img.width(),
            height: img.height(),
            provider: None,
        }
    }

    /// The file extension for the content type.
    pub fn extension(&self) -> &'static str {
        match self.content_type.as_str() {
            "image/jpeg" => "jpg",
            "image/webp" => "webp",
            _ => "png",
        }
    }
}

/// Why an engine gave no images. Each kind maps to one outcome for the task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The input cannot be used (the task fails with failCode `422`).
    #[error("{0}")]
    BadInput(String),
    /// The engine tried and could not generate (`501`).
    #[error("{0}")]
    GenerationFailed(String),
    /// Try again later (the task is retried, up to `limits.max_attempts`).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or broken environment (`500`).
    #[error("{0}")]
    Internal(String),
    /// The job was cancelled while it ran.
    #[error("cancelled")]
    Cancelled,
}

/// Runs an engine's CPU-bound work on the blocking pool and answers a cancellation at
/// once, without waiting for the work to notice it: the work is expected to watch the
/// same token and stop at its next checkpoint, so that it does not burn CPU to the end.
pub async fn run_blocking(
    engine: &str,
    cancel: &CancellationToken,
    work: impl FnOnce() -> Result<Vec<EngineImage>, EngineError> + Send + 'static,
) -> Result<Vec<EngineImage>, EngineError> {
    if cancel.is_cancelled() {
        return Err(EngineError::Cancelled);
    }
    let work = tokio::task::spawn_blocking(work);
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(EngineError::Cancelled),
        joined = work => joined.unwrap_or_else(|e| {
            Err(EngineError::Internal(format!("{engine} engine task failed: {e}")))
        }),
    }
}

/// The part an input image plays in a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRole {
    Base,
    Character,
    /// The character's mask; reduced like the character, so the two stay aligned.
    Mask,
    Style,
}

/// How much of an input image an engine uses, as displayed (orientation applied). The
/// worker reduces each image to this right after decoding, never enlarging it and
/// keeping its aspect ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkingSize {
    /// Every pixel.
    Full,
    /// The smallest size that still covers `w`×`h` (both sides at least these).
    Cover(u32, u32),
    /// The largest size that fits inside `w`×`h`.
    Fit(u32, u32),
    /// The engine does not read the pixels (it sends the [`Source`] bytes elsewhere):
    /// the image is not decoded, and the job's field holds an empty (0×0) image.
    Unused,
}

/// The longest side of a style image in [`default_working_size`]: style images only
/// give a palette (colour means and spreads), which a thumbnail holds as well as the
/// original.
pub const STYLE_THUMBNAIL_SIDE: u32 = 256;

/// What an engine that renders at the output size needs (the preview engine, and the
/// default of [`Engine::working_size`]): the base covering the output, which is then
/// cover-cropped to it; the character and its mask fitting a square of the output's
/// longest side (the character is drawn at most that large); style images as
/// thumbnails.
pub fn default_working_size(role: InputRole, (w, h): (u32, u32)) -> WorkingSize {
    match role {
        InputRole::Base => WorkingSize::Cover(w, h),
        InputRole::Character | InputRole::Mask => WorkingSize::Fit(w.max(h), w.max(h)),
        InputRole::Style => WorkingSize::Fit(STYLE_THUMBNAIL_SIDE, STYLE_THUMBNAIL_SIDE),
    }
}

/// Receives progress, 0..=100. Cheap to call often; it must not block.
pub type Progress = Arc<dyn Fn(u8) + Send + Sync>;

/// A way to turn jobs into images.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// A short name for logs and the start-up line (`preview`, `local`, `fal`, …).
    fn name(&self) -> &str;

    /// Whether the engine can take work now (weights loaded, provider key present).
    async fn ready(&self) -> Result<(), EngineError>;

    /// How much of an input in `role` this engine uses for an output of `output`
    /// (width, height) pixels. The worker reduces each decoded image to this before the
    /// job is built. The default suits engines that render at the output size
    /// ([`default_working_size`]); an engine that works at another size, or ignores an
    /// input, says so here.
    fn working_size(&self, role: InputRole, output: (u32, u32)) -> WorkingSize {
        default_working_size(role, output)
    }

    /// Whether the job must carry its inputs as fetched ([`UpstreamJob::sources`]), with
    /// URLs a provider can read. Engines that call a provider say yes.
    fn wants_sources(&self) -> bool {
        false
    }

    /// The task was cancelled by its owner after an earlier run recorded `handle`
    /// through [`UpstreamJob::checkpoint`]: cancel the provider's request, best effort.
    async fn abandon(&self, handle: &str) {
        let _ = handle;
    }

    /// Generates `job.num_images` images, image `i` from seed `job.seed + i`.
    ///
    /// Must return promptly with [`EngineError::Cancelled`] once `cancel` fires.
    async fn generate(
        &self,
        job: Job,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Vec<EngineImage>, EngineError>;
}

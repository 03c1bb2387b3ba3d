//! The `preview` engine: a weight-free, deterministic compositing pipeline.
//!
//! It exists for demos, development and the test suites of remixd's users: it needs no
//! model, runs in tens of milliseconds per image, and still does what a character
//! remix promises (the character, cut out, standing in the base scene, in the requested
//! style), so everything around an engine can be exercised for real.
//!
//! Image `i` of a job is a pure function of the job and `i` ([`render`]); the same job
//! gives the same pixels and, through [`encode_png`], the same bytes on the same build
//! and machine (the resizer picks its SIMD kernels at run time). The steps:
//!
//! 1. **Base.** Cover-cropped (centred) to the target's aspect ratio and resized to the
//!    target size: TURBO bilinear, BALANCED Catmull-Rom, QUALITY Lanczos3.
//! 2. **Strength.** The base layer becomes `base·s + wash·(1−s)`, where the wash is the
//!    style images' mean colour or, without style images, the character's
//!    (matte-weighted) mean colour. Only the base layer is washed: the character keeps
//!    its own colours.
//! 3. **Character.** The matte is the mask (stretched to the reference's size when the
//!    sizes differ) or a soft ellipse around the reference's centre. The reference is
//!    cut to the matte's bounding box, scaled to 60% of the frame's height (narrowed to
//!    fit the width), and alpha-blended at the lower centre, shifted by up to ±8% of
//!    the width and ±3% of the height by a ChaCha8 generator seeded with `seed + i`.
//!    **An all-black mask means "no character"**: the image is the washed and styled
//!    base. (Falling back to the ellipse would ignore what the user said.)
//! 4. **Style images.** The composited frame's colours are moved so that their mean and
//!    standard deviation per Oklab axis match those of all style images together.
//! 5. **Style.** FICTION posterises every channel to five levels and inks strong
//!    luminance edges (Sobel); REALISTIC applies a gentle S-curve, a slight warmth and a
//!    soft vignette; AUTO does nothing.
//!
//! Steps 4 and 5 grade the whole composited frame, character included, so the
//! character looks lit and drawn like the scene around it. With strength 1.0, AUTO and
//! no style images none of them runs, and every pixel outside the placed matte is the
//! resized base, bit for bit.
//!
//! The engine keeps [`crate::default_working_size`]: it never reads more of the base
//! than covers the output, more of the reference than the output's longest side, or
//! more of a style image than a thumbnail, so the worker hands it inputs of that size.
//!
//! **The prompt, the negative prompt and `expand_prompt` do not change any pixel**:
//! the preview engine has no text model. The seed only moves the character, so images
//! of a job with no character (all-black mask) are identical. Empty (0×0) images do not
//! fail: an empty base is black, an empty reference or mask means no character.

mod colour;
mod cutout;
mod frame;
mod resize;

pub use resize::cover_resize;
mod style;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::ops::Range;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder, RgbImage};
use remixd_domain::Style;
use tokio_util::sync::CancellationToken;

use crate::{Engine, EngineError, EngineImage, Job, Progress};
use colour::{Stats, TransferLut};
use cutout::{Cutout, Placement};
use frame::Frame;

/// Samples per image for colour statistics: a fixed grid of about this many pixels.
/// Means and spreads settle long before that, and it keeps the cost flat for big images.
const STATS_SAMPLES: u64 = 16_384;

/// Pixels per band of rows: 32 rows of a 1024-wide image, about 400 KB as float
/// planes, which stays in a core's L2 cache through all the stages.
const BAND_PIXELS: usize = 32 * 1024;

/// How the preview engine behaves beyond the job itself.
#[derive(Debug, Clone, Default)]
pub struct PreviewConfig {
    /// An artificial delay per image, to simulate a slow engine in demos and tests.
    /// Slept in short slices that watch for cancellation. Default: zero.
    pub delay_per_image: Duration,
}

/// The `preview` engine. See the module documentation for what it draws.
#[derive(Debug, Clone, Default)]
pub struct PreviewEngine {
    cfg: PreviewConfig,
}

impl PreviewEngine {
    pub fn new(cfg: PreviewConfig) -> Self {
        Self { cfg }
    }
}

#[async_trait]
impl Engine for PreviewEngine {
    fn name(&self) -> &str {
        "preview"
    }

    async fn ready(&self) -> Result<(), EngineError> {
        Ok(())
    }

    async fn generate(
        &self,
        job: Job,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Vec<EngineImage>, EngineError> {
        let delay = self.cfg.delay_per_image;
        let token = cancel.clone();
        tracing::debug!(task_id = %job.task_id, ?job, "preview: generating");
        crate::run_blocking("preview", &cancel, move || {
            run_job(&job, delay, &progress, &token)
        })
        .await
    }
}

/// Renders image `index` of `job`, synchronously. A pure function of `(job, index)`:
/// the same inputs give the same pixels, bit for bit. The result is
/// `job.size.dimensions()` in size.
pub fn render(job: &Job, index: u32) -> RgbImage {
    match Prepared::new(job).render(index, |_| Ok::<(), Infallible>(())) {
        Ok(img) => img,
        Err(never) => match never {},
    }
}

/// Encodes an RGB image as PNG (fast compression; the same image always gives the same
/// bytes). An image with no pixels has no PNG form and gives empty bytes.
pub fn encode_png(img: &RgbImage) -> Bytes {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Bytes::new();
    }
    let mut out = Vec::with_capacity(img.as_raw().len() / 2);
    // Paeth on every row: on photos about as small as adaptive filtering, which tries
    // all five filters per row and took twice as long at 1024² (measured: 8 vs 17 ms).
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Paeth)
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .expect(
            "an RgbImage's buffer always matches its dimensions, and a Vec cannot fail to grow",
        );
    Bytes::from(out)
}

/// A point inside one image's rendering where cancellation is checked and progress
/// reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The character is placed and the colour transfer is worked out.
    Planned,
    /// Every pixel is drawn.
    Drawn,
}

/// Everything about a job that does not depend on the image index: the resized base,
/// the scaled cut-out, the wash colour and the style images' statistics. Computed once
/// per job, so a four-image job pays for it once.
struct Prepared<'a> {
    job: &'a Job,
    w: u32,
    h: u32,
    /// The cover-resized base, interleaved RGB, `w`×`h`.
    base: Vec<u8>,
    cutout: Option<Cutout>,
    /// The colour the base is washed towards at strength below 1 (0..=255).
    wash: [f32; 3],
    /// Oklab statistics of all style images together; `None` without style images.
    style_lab: Option<Stats>,
}

impl<'a> Prepared<'a> {
    fn new(job: &'a Job) -> Self {
        let (w, h) = job.size.dimensions();
        let alg = resize::algorithm(job.rendering_speed);
        let base = resize::cover_rgb(job.base.as_raw(), job.base.dimensions(), (w, h), alg);
        let matte = cutout::matte(job);
        let cutout = cutout::cut_out(job, &matte, w, h);

        // The style images are pooled: each contributes a grid of samples, so a large
        // image weighs no more than a small one.
        let mut lab = Stats::default();
        let mut rgb = Stats::default();
        for img in &job.style_images {
            let (sw, sh) = img.dimensions();
            let step = colour::sample_step(sw, sh, STATS_SAMPLES);
            colour::sample_into(&mut lab, img.as_raw(), sw, sh, step, colour::oklab_from_255);
            colour::sample_into(&mut rgb, img.as_raw(), sw, sh, step, |p| p);
        }
        let style_lab = (!lab.is_empty()).then_some(lab);
        let wash = if rgb.is_empty() {
            cutout::mean_colour(job, &matte)
        } else {
            rgb.mean()
        };
        Self {
            job,
            w,
            h,
            base,
            cutout,
            wash,
            style_lab,
        }
    }

    /// Where the cut-out goes in image `index`.
    fn placement(&self, index: u32) -> Option<(&Cutout, Placement)> {
        let cut = self.cutout.as_ref()?;
        Some((
            cut,
            cutout::placement(cut, self.w, self.h, self.job.seed.for_image(index)),
        ))
    }

    /// Renders image `index`, calling `hook` after each [`Stage`]; an error from the
    /// hook (a cancellation) stops the rendering and is returned.
    ///
    /// The image is drawn in bands of rows (see [`frame`]): each band is washed,
    /// composited, graded and styled, then written out as bytes. FICTION's blur and
    /// edge filter look one row further each, so its bands are drawn with two extra
    /// rows above and below and only their middle is kept, which gives exactly the
    /// pixels a whole-image pass would.
    fn render<E>(
        &self,
        index: u32,
        mut hook: impl FnMut(Stage) -> Result<(), E>,
    ) -> Result<RgbImage, E> {
        let (w, h) = (self.w as usize, self.h as usize);
        let placed = self.placement(index);
        let lut = self
            .style_lab
            .as_ref()
            .map(|target| TransferLut::new(&self.composited_stats(placed), target));
        hook(Stage::Planned)?;

        let halo = if self.job.style == Style::Fiction {
            2
        } else {
            0
        };
        let band_rows = (BAND_PIXELS / w.max(1)).max(8);
        let mut out = vec![0u8; w * h * 3];
        let mut band = Frame::new(w);
        let mut scratch = Vec::new();
        for y0 in (0..h).step_by(band_rows) {
            let y1 = (y0 + band_rows).min(h);
            self.compose(
                &mut band,
                y0.saturating_sub(halo)..(y1 + halo).min(h),
                placed,
            );
            if let Some(lut) = &lut {
                lut.apply(&mut band);
            }
            match self.job.style {
                Style::Auto => {}
                Style::Fiction => style::fiction(&mut band, &mut scratch),
                Style::Realistic => style::realistic(&mut band, h),
            }
            let keep = y0 - band.y0..y1 - band.y0;
            band.write_rgb8(keep, &mut out[y0 * w * 3..y1 * w * 3]);
        }
        hook(Stage::Drawn)?;
        Ok(RgbImage::from_raw(self.w, self.h, out).expect("w×h RGB pixels were written"))
    }

    /// Makes `band` hold image rows `rows` of the washed base with the character
    /// composited over it.
    fn compose(&self, band: &mut Frame, rows: Range<usize>, placed: Option<(&Cutout, Placement)>) {
        let s = self.job.strength.get() as f32;
        band.fill_washed(&self.base, rows, s, self.wash);
        if let Some((cut, at)) = placed {
            cutout::composite(band, cut, at);
        }
    }

    /// Oklab statistics of the composited image (before grading), from a grid of
    /// samples. Only the grid's rows are composed, with the same code as the bands, so
    /// the statistics are those of exactly the pixels that will be graded.
    fn composited_stats(&self, placed: Option<(&Cutout, Placement)>) -> Stats {
        let step = colour::sample_step(self.w, self.h, STATS_SAMPLES);
        let mut stats = Stats::default();
        let mut row = Frame::new(self.w as usize);
        for y in (0..self.h as usize).step_by(step) {
            self.compose(&mut row, y..y + 1, placed);
            colour::sample_frame(&mut stats, &row, step);
        }
        stats
    }
}

/// Reports progress as a share of a fixed number of steps, strictly increasing, and
/// keeps 100 for the very end.
struct Meter<'a> {
    progress: &'a Progress,
    done: u32,
    total: u32,
    last: Option<u8>,
}

impl Meter<'_> {
    fn step(&mut self) {
        self.done += 1;
        let pct = (self.done * 100 / self.total).min(99) as u8;
        self.report(pct);
    }

    fn finish(&mut self) {
        self.report(100);
    }

    fn report(&mut self, pct: u8) {
        if self.last.is_none_or(|last| pct > last) {
            self.last = Some(pct);
            (self.progress)(pct);
        }
    }
}

fn check(cancel: &CancellationToken) -> Result<(), EngineError> {
    if cancel.is_cancelled() {
        Err(EngineError::Cancelled)
    } else {
        Ok(())
    }
}

/// Sleeps `delay` in slices short enough that a cancellation is noticed within ~10 ms.
fn pause(delay: Duration, cancel: &CancellationToken) -> Result<(), EngineError> {
    const SLICE: Duration = Duration::from_millis(10);
    let end = Instant::now() + delay;
    loop {
        check(cancel)?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(SLICE));
    }
}

/// The whole job, on a blocking thread: prepare once, then per image the delay, the
/// two rendering stages and the encoding, checking the token between each.
fn run_job(
    job: &Job,
    delay: Duration,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Vec<EngineImage>, EngineError> {
    let n = job.num_images.get();
    let mut meter = Meter {
        progress,
        done: 0,
        total: 1 + 4 * n,
        last: None,
    };
    check(cancel)?;
    let prepared = Prepared::new(job);
    meter.step();
    let mut images = Vec::with_capacity(n as usize);
    for i in 0..n {
        pause(delay, cancel)?;
        meter.step();
        let img = prepared.render(i, |_| {
            check(cancel)?;
            meter.step();
            Ok(())
        })?;
        let image = EngineImage::png(&img);
        check(cancel)?;
        meter.step();
        images.push(image);
    }
    meter.finish();
    Ok(images)
}

//! `remixd generate`: one job through the local engine, without the server.
//!
//! For trying a model and for timing it: the same engine code the service runs
//! (`LocalEngine::render`), fed from local files, with a progress bar per image and the
//! time each image took.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use remixd_domain::{ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style};

use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model directory in the diffusers layout (default: engine.local.model_dir).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Base image file.
    #[arg(long)]
    pub image: PathBuf,
    /// Character reference file (FLUX.2 models; Stable Diffusion ignores it). Default:
    /// the base image.
    #[arg(long)]
    pub character: Option<PathBuf>,
    /// The character's mask, white = character (FLUX.2 models).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// A style reference image; repeat for several (FLUX.2 models).
    #[arg(long = "style")]
    pub styles: Vec<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// image_size preset.
    #[arg(long, default_value = "square")]
    pub size: String,
    /// TURBO, BALANCED or QUALITY.
    #[arg(long, default_value = "TURBO")]
    pub speed: String,
    /// AUTO, REALISTIC or FICTION.
    #[arg(long = "style-type", default_value = "AUTO")]
    pub style_type: String,
    #[arg(long, default_value_t = 1)]
    pub num: i64,
    #[arg(long, default_value_t = 1)]
    pub seed: i64,
    /// 0.1..=1: high keeps the base image, low redraws more.
    #[arg(long, default_value_t = 0.5)]
    pub strength: f64,
    /// Where to write the images.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

fn rule<T>(flag: &str, r: Result<T, remixd_domain::input::RuleError>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("--{flag} {e}"))
}

pub fn run(settings: &Settings, args: GenerateArgs) -> anyhow::Result<()> {
    let mut local = settings.engine.local.clone();
    if let Some(dir) = args.model_dir.clone() {
        local.model_dir = Some(dir);
    }
    let cfg = local.to_config()?;
    let read = |p: &PathBuf| -> anyhow::Result<image::RgbImage> {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        remixd_fetch::decode_rgb(&bytes, 40_000_000)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let base = read(&args.image)?;
    let character = match &args.character {
        Some(p) => read(p)?,
        None => base.clone(),
    };
    let mask = match &args.mask {
        Some(p) => Some(image::DynamicImage::ImageRgb8(read(p)?).to_luma8()),
        None => None,
    };
    let style_images = args
        .styles
        .iter()
        .map(read)
        .collect::<anyhow::Result<_>>()?;
    let job = remixd_engine::Job {
        task_id: "generate".into(),
        base,
        character,
        mask,
        style_images,
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        expand_prompt: false,
        size: rule("size", ImageSize::parse(&args.size))?,
        num_images: rule("num", NumImages::new(args.num))?,
        seed: rule("seed", Seed::new(args.seed))?,
        strength: rule("strength", Strength::new(args.strength))?,
        style: rule("style-type", Style::parse(&args.style_type))?,
        rendering_speed: rule("speed", RenderingSpeed::parse(&args.speed))?,
        upstream: Default::default(),
    };

    let t = Instant::now();
    let dir = cfg.model_dir.display().to_string();
    let engine = remixd_diffusion::engine::LocalEngine::load(cfg)
        .with_context(|| format!("loading the model from {dir}"))?;
    eprintln!("model loaded in {:.1} s", t.elapsed().as_secs_f64());
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    for i in 0..job.num_images.get() {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template("image {msg} [{bar:30}] step {pos}/{len} {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("{}", i + 1));
        let t = Instant::now();
        let img = engine
            .render(&job, i, &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                true
            })
            .map_err(|e| anyhow::anyhow!("generating image {}: {e}", i + 1))?;
        bar.finish();
        let path = args
            .out
            .join(format!("remixd-{}.png", job.seed.for_image(i)));
        std::fs::write(&path, remixd_engine::preview::encode_png(&img))
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{} ({}x{}) in {:.2} s",
            path.display(),
            img.width(),
            img.height(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

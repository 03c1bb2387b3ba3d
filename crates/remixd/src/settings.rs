//! The settings tree: built-in defaults → TOML file → `REMIXD__SECTION__KEY`
//! environment variables → CLI flags, later wins (figment does the layering).
//!
//! Every struct denies unknown fields, so a misspelt key stops the start-up with its
//! name. Secrets are [`Secret`]s: they print as `<redacted>` in `config show` and logs.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use remixd_api::ErrorHttpStatus;
use remixd_domain::CreditPrices;
use serde::{Deserialize, Serialize, Serializer};

/// A secret string: redacted whenever printed.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub data_dir: PathBuf,
    pub database: DatabaseSettings,
    pub storage: StorageSettings,
    pub engine: EngineSettings,
    pub fetch: FetchSettings,
    pub limits: LimitsSettings,
    pub api: ApiSettings,
    pub callbacks: CallbackSettings,
    pub retention: RetentionSettings,
    pub credits: CreditPrices,
    pub worker: WorkerSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            server: ServerSettings::default(),
            data_dir: PathBuf::from("./remixd-data"),
            database: DatabaseSettings::default(),
            storage: StorageSettings::default(),
            engine: EngineSettings::default(),
            fetch: FetchSettings::default(),
            limits: LimitsSettings::default(),
            api: ApiSettings::default(),
            callbacks: CallbackSettings::default(),
            retention: RetentionSettings::default(),
            credits: CreditPrices::default(),
            worker: WorkerSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    /// Defaults to `http://<listen>` (with the port actually bound).
    pub public_url: Option<String>,
    pub metrics_listen: Option<String>,
    /// Time a client has to send a request's head: from the connection's start for its
    /// first request, from the first byte for later ones.
    pub header_timeout_ms: u64,
    /// Time a client has to send a request's whole body, from the end of its head.
    pub body_timeout_ms: u64,
    /// Time a kept-alive connection may wait between requests.
    pub idle_timeout_ms: u64,
    /// Connections open at once; `0` derives it from the open-files limit.
    pub max_connections: usize,
    /// Time open connections get to finish after shutdown begins; then they are dropped.
    pub shutdown_timeout_ms: u64,
    /// `GET /` and `/playground` serve the web playground.
    pub playground: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            metrics_listen: None,
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            max_connections: 0,
            shutdown_timeout_ms: 10_000,
            playground: true,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Defaults to `sqlite://<data_dir>/remixd.db`; or `postgres://user:password@host/db`.
    /// Printed with its password redacted.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: Option<String>,
    /// The most connections one process keeps to a PostgreSQL database.
    pub max_connections: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 16,
        }
    }
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// A database URL fit to print: its password, if any, replaced by `redacted`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        Ok(_) => url.to_string(),
        // Not a URL at all: print nothing of it that could be a secret.
        Err(_) if url.contains('@') => "<a URL that does not parse>".into(),
        Err(_) => url.to_string(),
    }
}

fn serialize_redacted_url<S: serde::Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&redact_url(u)),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Defaults to `file://<data_dir>/files`.
    pub url: Option<String>,
    pub s3: S3Settings,
    /// Below this much free space (MB) on the database's or the files' filesystem, new
    /// tasks and uploads are refused (455), `/readyz` is not ready and workers pause;
    /// 0 turns the check off.
    pub min_free_mb: u64,
    /// Plain `/files/` URLs answer 404; results are handed out as signed links.
    pub private_files: bool,
    /// How answers hand out the files: through the API nodes (`api`), or as presigned
    /// bucket URLs (`presigned`, with `storage.url = "s3://…"` only).
    pub public: PublicFiles,
}

/// `storage.public`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublicFiles {
    /// `<public_url>/files/<key>`, served by the API nodes.
    #[default]
    Api,
    /// A bucket URL signed for the answer's life (20 minutes; 24 hours in callbacks).
    Presigned,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            url: None,
            s3: S3Settings::default(),
            min_free_mb: 128,
            private_files: false,
            public: PublicFiles::Api,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key: Option<Secret>,
    pub secret: Option<Secret>,
    pub path_style: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    pub kind: String,
    pub concurrency: usize,
    pub local: LocalEngineSettings,
    /// Upstream engines tried, in order, when `kind`'s provider is unavailable.
    pub fallback: Vec<String>,
    pub fal: ProviderSettings,
    pub ideogram: ProviderSettings,
    pub preview: PreviewSettings,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            kind: "preview".into(),
            concurrency: 1,
            local: LocalEngineSettings::default(),
            fallback: Vec::new(),
            fal: ProviderSettings::default(),
            ideogram: ProviderSettings::default(),
            preview: PreviewSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalEngineSettings {
    pub model_dir: Option<PathBuf>,
    pub device: String,
    /// Steps of the full schedule per rendering speed (img2img runs the strength's share);
    /// unset: the model family's preset.
    pub steps_turbo: Option<usize>,
    pub steps_balanced: Option<usize>,
    pub steps_quality: Option<usize>,
    /// Classifier-free guidance scale; 1 or less turns guidance off (SD-Turbo, distilled
    /// klein); unset: the model family's preset.
    pub guidance_scale: Option<f64>,
    /// SD only: `ddim`, `euler`, `euler_a`, `dpmpp_2m`; empty takes the model's own
    /// scheduler.
    pub scheduler: String,
    /// FLUX.2 only: the text encoder's hidden states stacked into the prompt embeddings.
    pub text_layers: Vec<usize>,
    /// The side of the square whose pixel count images are generated at; unset: the
    /// model's native one.
    pub native_side: Option<u32>,
}

impl Default for LocalEngineSettings {
    fn default() -> Self {
        let d = remixd_diffusion::engine::LocalConfig::new(PathBuf::new());
        Self {
            model_dir: None,
            device: d.device,
            steps_turbo: None,
            steps_balanced: None,
            steps_quality: None,
            guidance_scale: None,
            scheduler: String::new(),
            text_layers: d.text_layers,
            native_side: None,
        }
    }
}

impl LocalEngineSettings {
    /// The engine's configuration; errors name the setting.
    pub fn to_config(&self) -> anyhow::Result<remixd_diffusion::engine::LocalConfig> {
        let Some(model_dir) = self.model_dir.clone() else {
            anyhow::bail!("engine.kind = \"local\" needs engine.local.model_dir (a diffusers-layout model directory)");
        };
        let steps = self.check()?;
        let scheduler = remixd_diffusion::engine::scheduler_setting(&self.scheduler)?;
        Ok(remixd_diffusion::engine::LocalConfig {
            model_dir,
            device: self.device.clone(),
            steps,
            guidance_scale: self.guidance_scale,
            scheduler,
            text_layers: self.text_layers.clone(),
            native_side: self.native_side,
        })
    }

    /// The ranges of the values that are set, and the steps per speed when they are;
    /// errors name the setting.
    fn check(&self) -> anyhow::Result<Option<[usize; 3]>> {
        for (key, v) in [
            ("steps_turbo", self.steps_turbo),
            ("steps_balanced", self.steps_balanced),
            ("steps_quality", self.steps_quality),
        ] {
            if let Some(v) = v {
                anyhow::ensure!(
                    (1..=200).contains(&v),
                    "engine.local.{key} must be 1..=200, not {v}"
                );
            }
        }
        if let Some(n) = self.native_side {
            anyhow::ensure!(
                (16..=4096).contains(&n),
                "engine.local.native_side must be 16..=4096, not {n}"
            );
        }
        if let Some(g) = self.guidance_scale {
            anyhow::ensure!(
                g.is_finite() && (0.0..=30.0).contains(&g),
                "engine.local.guidance_scale must be 0..=30"
            );
        }
        anyhow::ensure!(
            !self.text_layers.is_empty()
                && self.text_layers.len() <= 16
                && self.text_layers.iter().all(|&l| l <= 1000),
            "engine.local.text_layers must list 1 to 16 layer indices (each at most 1000), \
             such as [9, 18, 27]"
        );
        match (self.steps_turbo, self.steps_balanced, self.steps_quality) {
            (None, None, None) => Ok(None),
            (Some(t), Some(b), Some(q)) => Ok(Some([t, b, q])),
            _ => anyhow::bail!(
                "engine.local.steps_turbo, steps_balanced and steps_quality are set together \
                 or not at all (unset: the model family's presets)"
            ),
        }
    }
}

/// One upstream provider (`engine.fal`, `engine.ideogram`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderSettings {
    /// Unset: the provider's usual environment variable (`FAL_KEY`, `IDEOGRAM_API_KEY`).
    pub key: Option<Secret>,
    /// Unset: the provider's real API.
    pub base_url: Option<String>,
    /// Requests open at the provider at once, per worker process.
    pub concurrency: usize,
    pub connect_timeout_s: f64,
    /// One HTTP exchange; unset: 60 s for fal, 180 s for Ideogram (whose answer is the
    /// whole generation).
    pub request_timeout_s: Option<f64>,
    /// Everything for one task on this provider.
    pub task_timeout_s: f64,
    /// Retries of one call on connection failures, 429 and 5xx.
    pub retries: u32,
    pub retry_base_ms: u64,
    pub retry_max_s: f64,
    /// How often a queued request's status is asked (fal).
    pub poll_ms: u64,
    /// Unavailable outcomes in a row that open the circuit, and its cool-down.
    pub breaker_failures: u32,
    pub breaker_cooldown_s: f64,
    /// fal only: send the inputs as `data:` URIs instead of URLs, for a server the
    /// provider cannot reach on `server.public_url`.
    pub inline_inputs: bool,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        let d = remixd_upstream::ProviderConfig::new(remixd_upstream::Kind::Fal, "");
        Self {
            key: None,
            base_url: None,
            concurrency: d.concurrency,
            connect_timeout_s: d.connect_timeout.as_secs_f64(),
            request_timeout_s: None,
            task_timeout_s: d.task_timeout.as_secs_f64(),
            retries: d.retries,
            retry_base_ms: d.retry_base.as_millis() as u64,
            retry_max_s: d.retry_max.as_secs_f64(),
            poll_ms: d.poll_interval.as_millis() as u64,
            breaker_failures: d.breaker_failures,
            breaker_cooldown_s: d.breaker_cooldown.as_secs_f64(),
            inline_inputs: d.inline_inputs,
        }
    }
}

impl ProviderSettings {
    /// Range checks; errors name the setting.
    fn check(&self, name: &str) -> anyhow::Result<()> {
        let k = |key: &str| format!("engine.{name}.{key}");
        within(&k("concurrency"), self.concurrency, 1, 10_000)?;
        seconds(&k("connect_timeout_s"), self.connect_timeout_s, 0.01, 600.0)?;
        if let Some(t) = self.request_timeout_s {
            seconds(&k("request_timeout_s"), t, 0.01, 3600.0)?;
        }
        seconds(&k("task_timeout_s"), self.task_timeout_s, 0.1, 86_400.0)?;
        within(&k("retries"), self.retries, 0, 20)?;
        within(&k("retry_base_ms"), self.retry_base_ms, 1, 600_000)?;
        seconds(&k("retry_max_s"), self.retry_max_s, 0.001, 3600.0)?;
        within(&k("poll_ms"), self.poll_ms, 10, 600_000)?;
        within(&k("breaker_failures"), self.breaker_failures, 1, 1000)?;
        seconds(
            &k("breaker_cooldown_s"),
            self.breaker_cooldown_s,
            0.001,
            86_400.0,
        )?;
        if let Some(u) = &self.base_url {
            let parsed = url::Url::parse(u)
                .map_err(|e| anyhow::anyhow!("engine.{name}.base_url {u:?}: {e}"))?;
            anyhow::ensure!(
                matches!(parsed.scheme(), "http" | "https"),
                "engine.{name}.base_url must be http or https"
            );
        }
        anyhow::ensure!(
            !self.inline_inputs || name == "fal",
            "engine.{name}.inline_inputs is a fal setting (Ideogram always gets the files)"
        );
        Ok(())
    }

    /// The provider's configuration; the key from here or the provider's environment
    /// variable.
    pub fn to_config(&self, kind: remixd_upstream::Kind) -> remixd_upstream::ProviderConfig {
        let d = remixd_upstream::ProviderConfig::new(kind, "");
        let secs = std::time::Duration::from_secs_f64;
        remixd_upstream::ProviderConfig {
            key: self
                .key
                .as_ref()
                .map(|k| k.0.clone())
                .or_else(|| std::env::var(remixd_upstream::key_env(kind)).ok())
                .unwrap_or_default(),
            base_url: self
                .base_url
                .clone()
                .unwrap_or_else(|| kind.default_base_url().to_string()),
            concurrency: self.concurrency,
            connect_timeout: secs(self.connect_timeout_s),
            request_timeout: self.request_timeout_s.map_or(d.request_timeout, secs),
            task_timeout: secs(self.task_timeout_s),
            retries: self.retries,
            retry_base: std::time::Duration::from_millis(self.retry_base_ms),
            retry_max: secs(self.retry_max_s),
            poll_interval: std::time::Duration::from_millis(self.poll_ms),
            breaker_failures: self.breaker_failures,
            breaker_cooldown: secs(self.breaker_cooldown_s),
            inline_inputs: self.inline_inputs,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreviewSettings {
    /// An artificial delay per image, to make the preview engine behave like a slow
    /// one in demos and tests (progress bars, kill-and-restart runs).
    pub delay_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchSettings {
    pub allow: Vec<String>,
    pub timeout_s: u64,
    /// Bound on all of one task's downloads together.
    pub task_timeout_s: u64,
    pub max_image_bytes: u64,
    pub max_pixels: u64,
    /// The sum of width × height over all images of one task, from their headers.
    pub max_task_pixels: u64,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            timeout_s: 30,
            task_timeout_s: 60,
            max_image_bytes: 10 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_task_pixels: 120_000_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    pub create_per_10s: u32,
    pub query_per_s: u32,
    pub max_attempts: i64,
    /// SSE streams open at once per API key.
    pub streams_per_key: usize,
    /// Uploads per account per 10 s; 0 turns the limit off.
    pub uploads_per_10s: u32,
    /// Bytes of unexpired uploads one account may keep; 0: no quota.
    pub upload_quota_bytes: u64,
    /// Uploads being received at once for one account; 0: no cap.
    pub uploads_in_flight_per_account: usize,
    /// Uploads being received at once by one API process; 0: no cap.
    pub uploads_in_flight: usize,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            create_per_10s: 20,
            query_per_s: 10,
            max_attempts: 3,
            streams_per_key: 8,
            uploads_per_10s: 20,
            upload_quota_bytes: 1 << 30,
            uploads_in_flight_per_account: 4,
            uploads_in_flight: 8,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    pub error_http_status: ErrorHttpStatus,
    pub maintenance: bool,
    pub disabled: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackSettings {
    /// Limit of one delivery attempt.
    pub timeout_s: f64,
    /// Delays before each retry, in milliseconds; after the last the delivery is given up.
    pub retry_schedule_ms: Vec<u64>,
    /// Delivery attempts in flight at once.
    pub concurrency: usize,
}

impl Default for CallbackSettings {
    fn default() -> Self {
        Self {
            timeout_s: 15.0,
            retry_schedule_ms: remixd_worker::callbacks::DEFAULT_SCHEDULE_S
                .iter()
                .map(|s| s * 1000)
                .collect(),
            concurrency: 32,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// Generated images are deleted after this many days (fractions allowed).
    pub results_days: f64,
    /// Uploads are deleted after this many hours.
    pub uploads_hours: f64,
    /// Task records are deleted after this many days.
    pub tasks_days: f64,
    /// Seconds between retention sweeps.
    pub sweep_interval_s: f64,
    /// Seconds between sweeps for orphaned task files (the first runs at start).
    pub orphans_interval_s: f64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            results_days: 14.0,
            uploads_hours: 24.0,
            tasks_days: 60.0,
            sweep_interval_s: 300.0,
            orphans_interval_s: 3600.0,
        }
    }
}

/// Worker timings (remixd's own keys, beyond the contract's table).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// How long a claim lasts without a heartbeat; a dead worker's task waits this long.
    pub lease_ms: u64,
    /// How often idle workers look for work that no wake-up announced.
    pub poll_ms: u64,
    /// Tasks fetching their inputs at once.
    pub fetch_concurrency: usize,
    /// How many of those one account may hold; unset: half of `fetch_concurrency`, at
    /// least 1.
    pub fetch_per_account: Option<usize>,
    /// Wait before retrying a task whose engine was temporarily unavailable.
    pub retry_delay_ms: u64,
    /// Time that work in hand gets to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Image decodes running at once in the process (each holds a full-size canvas).
    pub decode_concurrency: usize,
    /// How long the signed links to uploaded inputs that an upstream engine gives its
    /// provider stay valid.
    pub source_link_s: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            lease_ms: 30_000,
            poll_ms: 1_000,
            fetch_concurrency: 4,
            fetch_per_account: None,
            retry_delay_ms: 10_000,
            shutdown_grace_ms: 20_000,
            decode_concurrency: 2,
            source_link_s: 7200,
        }
    }
}

impl Settings {
    /// Tasks a worker process generates at once: `engine.concurrency`, and for the
    /// upstream engines at least the providers' concurrency together, since their tasks
    /// mostly wait on the provider (`engine.<provider>.concurrency` is then the knob).
    pub fn engine_loops(&self) -> usize {
        let e = &self.engine;
        let upstream: usize = std::iter::once(&e.kind)
            .chain(&e.fallback)
            .filter_map(|k| match k.as_str() {
                "fal" => Some(e.fal.concurrency),
                "ideogram" => Some(e.ideogram.concurrency),
                _ => None,
            })
            .sum();
        e.concurrency.max(upstream)
    }
}

impl WorkerSettings {
    /// `fetch_per_account`, or its default: half the fetch slots, at least one.
    pub fn fetch_per_account(&self) -> usize {
        self.fetch_per_account
            .unwrap_or((self.fetch_concurrency / 2).max(1))
    }
}

impl Settings {
    /// Loads the layers. `file` is `--config`; without it `remixd.toml` in the working
    /// directory is read when present.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::extract(Self::figment(file))
    }

    /// The built-in defaults with one TOML document over them, and nothing else (no
    /// file, no environment): what `load` makes of a file holding `toml` when no
    /// `REMIXD__` variable is set. For tests and the fuzzing harness (`fuzz/`).
    pub fn from_toml_str(toml: &str) -> anyhow::Result<Self> {
        Self::extract(Self::defaults().merge(Toml::string(toml)))
    }

    fn defaults() -> Figment {
        Figment::from(Serialized::defaults(Settings::default()))
    }

    fn extract(figment: Figment) -> anyhow::Result<Self> {
        figment
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    pub fn figment(file: Option<&Path>) -> Figment {
        let mut f = Self::defaults();
        match file {
            Some(p) => f = f.merge(Toml::file_exact(p)),
            None => {
                if Path::new("remixd.toml").exists() {
                    f = f.merge(Toml::file_exact("remixd.toml"));
                }
            }
        }
        f.merge(Env::prefixed("REMIXD__").split("__"))
    }

    pub fn database_url(&self) -> String {
        self.database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("remixd.db").display()))
    }

    /// How to reach the bucket of an `s3://` storage URL (`storage.s3.*`).
    pub fn s3_options(&self) -> remixd_store::blobs::S3Options {
        let s3 = &self.storage.s3;
        remixd_store::blobs::S3Options {
            endpoint: s3.endpoint.clone(),
            region: s3.region.clone(),
            access_key: s3.access_key.as_ref().map(|k| k.0.clone()),
            secret: s3.secret.as_ref().map(|k| k.0.clone()),
            path_style: s3.path_style,
        }
    }

    pub fn storage_url(&self) -> String {
        self.storage.url.clone().unwrap_or_else(|| {
            let dir = self.data_dir.join("files");
            let abs = std::path::absolute(&dir).unwrap_or(dir);
            format!("file://{}", abs.display())
        })
    }

    /// Checks what serde cannot: values that parse but make no sense. Every number is
    /// range-checked here, so nothing downstream meets a negative, NaN or absurd value
    /// (a negative duration would panic, a negative price would add credits).
    pub fn check(&self) -> anyhow::Result<()> {
        within(
            "database.max_connections",
            self.database.max_connections,
            1,
            1000,
        )?;
        for d in &self.api.disabled {
            anyhow::ensure!(
                remixd_api::ENDPOINTS.contains(&d.as_str()),
                "api.disabled: unknown endpoint {d:?} (known: {})",
                remixd_api::ENDPOINTS.join(", ")
            );
        }
        anyhow::ensure!(
            self.fetch.task_timeout_s >= self.fetch.timeout_s && self.fetch.task_timeout_s <= 3600,
            "fetch.task_timeout_s must be at least fetch.timeout_s ({}) and at most 3600, not {}",
            self.fetch.timeout_s,
            self.fetch.task_timeout_s
        );
        if let Some(n) = self.worker.fetch_per_account {
            anyhow::ensure!(
                (1..=self.worker.fetch_concurrency).contains(&n),
                "worker.fetch_per_account must be between 1 and worker.fetch_concurrency ({}), not {n}",
                self.worker.fetch_concurrency
            );
        }
        let srv = &self.server;
        for (key, v, range) in [
            ("header_timeout_ms", srv.header_timeout_ms, 100..=600_000),
            ("body_timeout_ms", srv.body_timeout_ms, 100..=3_600_000),
            ("idle_timeout_ms", srv.idle_timeout_ms, 100..=3_600_000),
            ("shutdown_timeout_ms", srv.shutdown_timeout_ms, 0..=600_000),
        ] {
            anyhow::ensure!(
                range.contains(&v),
                "server.{key} must be {}..={} (milliseconds), not {v}",
                range.start(),
                range.end()
            );
        }
        anyhow::ensure!(
            srv.max_connections <= 1_000_000,
            "server.max_connections must be 0 (derived from the open-files limit) or 1..=1000000, not {}",
            srv.max_connections
        );
        anyhow::ensure!(
            (1..=1000).contains(&self.limits.streams_per_key),
            "limits.streams_per_key must be 1..=1000, not {}",
            self.limits.streams_per_key
        );
        anyhow::ensure!(
            self.fetch.max_pixels >= 1,
            "fetch.max_pixels must be at least 1"
        );
        anyhow::ensure!(
            self.fetch.max_task_pixels >= self.fetch.max_pixels,
            "fetch.max_task_pixels must be at least fetch.max_pixels ({}), or no task could use an image of the largest size",
            self.fetch.max_pixels
        );
        anyhow::ensure!(
            (1..=64).contains(&self.worker.decode_concurrency),
            "worker.decode_concurrency must be 1..=64, not {}",
            self.worker.decode_concurrency
        );
        let quota = self.limits.upload_quota_bytes;
        anyhow::ensure!(
            quota == 0 || quota >= self.fetch.max_image_bytes,
            "limits.upload_quota_bytes must be 0 (no quota) or at least fetch.max_image_bytes ({}), or no upload of the largest size could be kept",
            self.fetch.max_image_bytes
        );
        for (key, v) in [
            (
                "uploads_in_flight_per_account",
                self.limits.uploads_in_flight_per_account,
            ),
            ("uploads_in_flight", self.limits.uploads_in_flight),
        ] {
            anyhow::ensure!(
                v <= 100_000,
                "limits.{key} must be 0 (no cap) up to 100000, not {v}"
            );
        }
        anyhow::ensure!(
            self.storage.public == PublicFiles::Api || self.storage_url().starts_with("s3://"),
            "storage.public = \"presigned\" needs the files in a bucket (storage.url = \"s3://bucket/prefix\"), not {}",
            self.storage_url()
        );
        if let Some(u) = &self.server.public_url {
            let parsed =
                url::Url::parse(u).map_err(|e| anyhow::anyhow!("server.public_url {u:?}: {e}"))?;
            anyhow::ensure!(
                matches!(parsed.scheme(), "http" | "https"),
                "server.public_url must be http or https"
            );
        }
        remixd_fetch::AddressPolicy::new(&self.fetch.allow)
            .map_err(|e| anyhow::anyhow!("fetch.allow: {e}"))?;

        let (e, w) = (&self.engine, &self.worker);
        within("engine.concurrency", e.concurrency, 1, 64)?;
        within("engine.preview.delay_ms", e.preview.delay_ms, 0, 3_600_000)?;
        e.local.check()?;
        e.fal.check("fal")?;
        e.ideogram.check("ideogram")?;
        for (i, f) in e.fallback.iter().enumerate() {
            anyhow::ensure!(
                remixd_upstream::Kind::parse(f).is_some(),
                "engine.fallback[{i}] = {f:?}: only upstream engines (fal, ideogram) can be fallbacks"
            );
            anyhow::ensure!(
                *f != e.kind && !e.fallback[..i].contains(f),
                "engine.fallback[{i}] = {f:?} is listed twice (engine.kind or an earlier fallback)"
            );
        }
        anyhow::ensure!(
            e.fallback.is_empty() || remixd_upstream::Kind::parse(&e.kind).is_some(),
            "engine.fallback is for upstream engines; engine.kind = {:?} runs here",
            e.kind
        );
        within("worker.source_link_s", w.source_link_s, 60, 7 * 86_400)?;

        let f = &self.fetch;
        within("fetch.timeout_s", f.timeout_s, 1, 3600)?;
        within("fetch.max_image_bytes", f.max_image_bytes, 1024, 1 << 30)?;
        within("fetch.max_pixels", f.max_pixels, 1, 1_000_000_000)?;

        within(
            "limits.create_per_10s",
            self.limits.create_per_10s,
            1,
            1_000_000,
        )?;
        within("limits.query_per_s", self.limits.query_per_s, 1, 1_000_000)?;
        within("limits.max_attempts", self.limits.max_attempts, 1, 100)?;

        let c = &self.callbacks;
        seconds("callbacks.timeout_s", c.timeout_s, 0.1, 600.0)?;
        within("callbacks.concurrency", c.concurrency, 1, 10_000)?;
        for (i, ms) in c.retry_schedule_ms.iter().enumerate() {
            within(
                &format!("callbacks.retry_schedule_ms[{i}]"),
                *ms,
                0,
                7 * 86_400_000,
            )?;
        }

        let r = &self.retention;
        seconds("retention.results_days", r.results_days, 1e-6, 36_500.0)?;
        seconds("retention.uploads_hours", r.uploads_hours, 1e-6, 876_000.0)?;
        seconds("retention.tasks_days", r.tasks_days, 1e-6, 36_500.0)?;
        seconds(
            "retention.sweep_interval_s",
            r.sweep_interval_s,
            0.01,
            86_400.0,
        )?;
        seconds(
            "retention.orphans_interval_s",
            r.orphans_interval_s,
            0.01,
            7.0 * 86_400.0,
        )?;

        let p = &self.credits;
        for (key, v) in [
            ("credits.turbo", p.turbo),
            ("credits.balanced", p.balanced),
            ("credits.quality", p.quality),
        ] {
            within(key, v, 0, 1_000_000)?;
        }

        within("worker.lease_ms", w.lease_ms, 300, 3_600_000)?;
        within("worker.poll_ms", w.poll_ms, 10, 60_000)?;
        within("worker.fetch_concurrency", w.fetch_concurrency, 1, 256)?;
        within("worker.retry_delay_ms", w.retry_delay_ms, 0, 3_600_000)?;
        within(
            "worker.shutdown_grace_ms",
            w.shutdown_grace_ms,
            0,
            3_600_000,
        )?;

        within(
            "storage.min_free_mb",
            self.storage.min_free_mb,
            0,
            1_000_000_000,
        )?;
        Ok(())
    }
}

/// `key` must lie in `lo..=hi`.
fn within<T: PartialOrd + std::fmt::Display>(key: &str, v: T, lo: T, hi: T) -> anyhow::Result<()> {
    anyhow::ensure!(
        v >= lo && v <= hi,
        "{key} must be between {lo} and {hi}, not {v}"
    );
    Ok(())
}

/// A real number (a duration, a scale) that must be finite and in `lo..=hi`.
fn seconds(key: &str, v: f64, lo: f64, hi: f64) -> anyhow::Result<()> {
    anyhow::ensure!(v.is_finite(), "{key} must be a finite number, not {v}");
    within(key, v, lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::default();
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert_eq!(s.engine.kind, "preview");
        assert_eq!(s.limits.max_attempts, 3);
        assert_eq!(s.fetch.max_image_bytes, 10_485_760);
        assert!(s.database_url().ends_with("remixd-data/remixd.db"));
        assert_eq!(s.fetch.task_timeout_s, 60);
        assert_eq!(s.worker.fetch_per_account(), 2);
        assert!(!s.storage.private_files);
        assert_eq!(
            (
                s.server.header_timeout_ms,
                s.server.body_timeout_ms,
                s.server.idle_timeout_ms,
                s.server.max_connections,
                s.server.shutdown_timeout_ms,
                s.limits.streams_per_key
            ),
            (10_000, 60_000, 60_000, 0, 10_000, 8)
        );
        s.check().unwrap();
    }

    #[test]
    fn fetch_sharing_settings_are_range_checked() {
        let mut s = Settings::default();
        s.worker.fetch_concurrency = 1;
        assert_eq!(s.worker.fetch_per_account(), 1, "at least one");
        s.worker.fetch_per_account = Some(2);
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("worker.fetch_per_account"), "{e}");
        s.worker.fetch_per_account = Some(1);
        s.check().unwrap();
        s.fetch.task_timeout_s = 10;
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("fetch.task_timeout_s"), "{e}");
    }

    #[test]
    fn server_timeouts_and_stream_cap_are_range_checked() {
        let bad = |f: fn(&mut Settings)| {
            let mut s = Settings::default();
            f(&mut s);
            s.check().unwrap_err().to_string()
        };
        assert!(bad(|s| s.server.header_timeout_ms = 0).contains("server.header_timeout_ms"));
        assert!(bad(|s| s.server.body_timeout_ms = 99).contains("server.body_timeout_ms"));
        assert!(bad(|s| s.server.idle_timeout_ms = 4_000_000).contains("server.idle_timeout_ms"));
        assert!(
            bad(|s| s.server.shutdown_timeout_ms = 600_001).contains("server.shutdown_timeout_ms")
        );
        assert!(bad(|s| s.server.max_connections = 2_000_000).contains("server.max_connections"));
        assert!(bad(|s| s.limits.streams_per_key = 0).contains("limits.streams_per_key"));
        let mut ok = Settings::default();
        ok.server.shutdown_timeout_ms = 0;
        ok.server.max_connections = 1;
        ok.check().unwrap();
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn a_toml_string_loads_like_a_file() {
        let text = "data_dir = \"/srv/remixd\"\n[worker]\nlease_ms = 5000\n[fetch]\nallow = [\"::1/128\"]\n";
        figment::Jail::expect_with(|jail| {
            jail.create_file("r.toml", text)?;
            let from_file = Settings::load(Some(Path::new("r.toml"))).unwrap();
            let from_str = Settings::from_toml_str(text).unwrap();
            assert_eq!(format!("{from_str:?}"), format!("{from_file:?}"));
            Ok(())
        });
        let s = Settings::from_toml_str(text).unwrap();
        assert_eq!(s.worker.lease_ms, 5000);
        assert_eq!(s.data_dir, PathBuf::from("/srv/remixd"));
        // Everything not given keeps its default.
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        let e = Settings::from_toml_str("[worker]\nlease_msec = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease_msec"), "{e}");
        assert!(Settings::from_toml_str("[worker\n").is_err());
        assert!(Settings::from_toml_str("worker = 3\n").is_err());
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn layers_and_unknown_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "r.toml",
                "[server]\nlisten = \"127.0.0.1:9000\"\n[fetch]\nallow = [\"127.0.0.1/32\"]\n",
            )?;
            jail.set_env("REMIXD__SERVER__LISTEN", "127.0.0.1:9001");
            jail.set_env("REMIXD__API__ERROR_HTTP_STATUS", "always-200");
            let s = Settings::load(Some(Path::new("r.toml"))).unwrap();
            assert_eq!(s.server.listen, "127.0.0.1:9001", "env wins over the file");
            assert_eq!(s.fetch.allow, vec!["127.0.0.1/32"]);
            assert_eq!(s.api.error_http_status, ErrorHttpStatus::Always200);

            jail.create_file("bad.toml", "[server]\nlisten = \"x\"\nlistne = \"y\"\n")?;
            let e = Settings::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("listne"), "{e}");
            Ok(())
        });
    }

    /// Every section refuses unknown keys, and every value out of its range stops the
    /// start with a sentence naming the key (a negative price would add credits; a
    /// negative or NaN duration would panic).
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn every_section_and_value_is_checked() {
        figment::Jail::expect_with(|jail| {
            for (toml, key) in [
                ("[credits]\nturbo = 5\nturob = 1\n", "turob"),
                ("[storage]\nmin_free_mbb = 1\n", "min_free_mbb"),
                ("[retention]\nsweep_intervals = 1\n", "sweep_intervals"),
                ("[storage]\npublic = \"bucket\"\n", "storage.public"),
            ] {
                jail.create_file("u.toml", toml)?;
                let e = Settings::load(Some(Path::new("u.toml")))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(key), "{toml:?}: {e}");
            }
            for (toml, key) in [
                ("[credits]\nturbo = -12\n", "credits.turbo"),
                ("[callbacks]\ntimeout_s = -1.0\n", "callbacks.timeout_s"),
                ("[callbacks]\ntimeout_s = nan\n", "callbacks.timeout_s"),
                (
                    "[retention]\nsweep_interval_s = -5.0\n",
                    "retention.sweep_interval_s",
                ),
                (
                    "[retention]\nresults_days = inf\n",
                    "retention.results_days",
                ),
                ("[retention]\ntasks_days = 0.0\n", "retention.tasks_days"),
                ("[limits]\nquery_per_s = 0\n", "limits.query_per_s"),
                ("[worker]\npoll_ms = 0\n", "worker.poll_ms"),
                ("[fetch]\nmax_image_bytes = 0\n", "fetch.max_image_bytes"),
                ("[fetch]\nallow = [\"not a cidr/99\"]\n", "fetch.allow"),
                ("[engine]\nconcurrency = 0\n", "engine.concurrency"),
                (
                    "[engine.local]\nguidance_scale = nan\n",
                    "engine.local.guidance_scale",
                ),
                (
                    "[engine.local]\nsteps_turbo = 2\n",
                    "engine.local.steps_turbo, steps_balanced and steps_quality",
                ),
                (
                    "[engine.local]\ntext_layers = []\n",
                    "engine.local.text_layers",
                ),
                (
                    "[engine.local]\nnative_side = 8\n",
                    "engine.local.native_side",
                ),
                ("[engine.fal]\nretries = 100\n", "engine.fal.retries"),
                (
                    "[engine.ideogram]\ntask_timeout_s = -1.0\n",
                    "engine.ideogram.task_timeout_s",
                ),
                (
                    "[engine.fal]\nbase_url = \"ftp://x\"\n",
                    "engine.fal.base_url",
                ),
                (
                    "[engine.ideogram]\ninline_inputs = true\n",
                    "engine.ideogram.inline_inputs",
                ),
                (
                    "[engine]\nkind = \"fal\"\nfallback = [\"preview\"]\n",
                    "engine.fallback[0]",
                ),
                (
                    "[engine]\nkind = \"fal\"\nfallback = [\"ideogram\", \"fal\"]\n",
                    "engine.fallback[1]",
                ),
                (
                    "[engine]\nfallback = [\"fal\"]\n",
                    "engine.fallback is for upstream engines",
                ),
                (
                    "[storage]\npublic = \"presigned\"\n",
                    "storage.public = \"presigned\" needs the files in a bucket",
                ),
            ] {
                jail.create_file("r.toml", toml)?;
                let s = Settings::load(Some(Path::new("r.toml"))).expect(toml);
                let e = s.check().unwrap_err().to_string();
                assert!(e.starts_with(key), "{toml:?}: {e}");
            }
            assert!(Settings::default().check().is_ok());
            Ok(())
        });
    }

    #[test]
    fn upstream_engines_generate_as_many_tasks_as_their_providers_take() {
        let mut s = Settings::default();
        assert_eq!(s.engine_loops(), 1);
        s.engine.kind = "fal".into();
        assert_eq!(s.engine_loops(), 8);
        s.engine.fallback = vec!["ideogram".into()];
        s.engine.ideogram.concurrency = 3;
        assert_eq!(s.engine_loops(), 11);
        s.engine.concurrency = 20;
        assert_eq!(s.engine_loops(), 20);
    }

    #[test]
    fn new_limits_are_range_checked_by_name() {
        assert!(Settings::default().check().is_ok());
        let err = |tweak: fn(&mut Settings)| {
            let mut s = Settings::default();
            tweak(&mut s);
            s.check().unwrap_err().to_string()
        };
        assert!(err(|s| s.worker.decode_concurrency = 0).contains("worker.decode_concurrency"));
        assert!(err(|s| s.worker.decode_concurrency = 65).contains("worker.decode_concurrency"));
        assert!(err(|s| s.fetch.max_task_pixels = 1000).contains("fetch.max_task_pixels"));
        assert!(err(|s| s.limits.upload_quota_bytes = 5).contains("limits.upload_quota_bytes"));
        assert!(err(|s| s.limits.uploads_in_flight = 1 << 20).contains("limits.uploads_in_flight"));
        let mut s = Settings::default();
        s.limits.upload_quota_bytes = 0;
        s.limits.uploads_in_flight = 0;
        assert!(s.check().is_ok(), "0 turns them off");
    }

    #[test]
    fn secrets_never_print() {
        let mut s = Settings::default();
        s.engine.fal.key = Some(Secret("fal-very-secret".into()));
        s.database.url = Some("postgres://remixd:pw-very-secret@db.internal:5432/remixd".into());
        let shown = toml::to_string(&s).unwrap();
        assert!(!shown.contains("very-secret") && shown.contains("<redacted>"));
        assert!(shown.contains("db.internal:5432/remixd"), "{shown}");
        assert!(!format!("{s:?}").contains("very-secret"));
    }

    #[test]
    fn database_urls_print_without_their_password() {
        assert_eq!(
            redact_url("postgres://u:hunter2@db:5432/remixd?sslmode=require"),
            "postgres://u:redacted@db:5432/remixd?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u@db/remixd"),
            "postgres://u@db/remixd"
        );
        assert_eq!(
            redact_url("sqlite:///var/lib/remixd.db"),
            "sqlite:///var/lib/remixd.db"
        );
        assert!(!redact_url("not a url:hunter2@x").contains("hunter2"));
        let mut s = Settings::default();
        s.database.max_connections = 0;
        assert!(s
            .check()
            .unwrap_err()
            .to_string()
            .contains("database.max_connections"));
    }
}
